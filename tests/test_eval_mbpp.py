"""The sandboxed MBPP twin mirrors lm-eval's `mbpp` and runs from a local file."""

import ast
import json
from pathlib import Path

import lm_eval.tasks
import pytest
import yaml

from flarectl.evaluation.runner import EvalSettings, run_eval
from flarectl.evaluation.task_specs import SHIPPED_DIR
from flarectl.evaluation.tasks import mbpp_utils

UPSTREAM = Path(lm_eval.tasks.__file__).parent / "mbpp"
DOCS = [
    {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character.",
     "code": "def remove_Occ(s,ch):\n    return s.replace(ch, '', 1)[::-1].replace(ch, '', 1)[::-1]",
     "test_list": ["assert remove_Occ(\"hello\",\"l\") == \"heo\"", "assert remove_Occ(\"abcda\",\"a\") == \"bcd\"",
                   "assert remove_Occ(\"PHP\",\"P\") == \"H\""], "test_setup_code": "", "challenge_test_list": []},
]


def _yaml(path):
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load(path.read_text(), Loader=Loader)


def test_twin_mirrors_upstream_mbpp():
    upstream, twin = _yaml(UPSTREAM / "mbpp.yaml"), _yaml(SHIPPED_DIR / "flarectl_mbpp.yaml")
    for key in ("dataset_path", "dataset_name", "test_split", "doc_to_text", "doc_to_target", "target_delimiter",
                "generation_kwargs", "num_fewshot", "output_type"):
        assert twin[key] == upstream[key], key
    assert twin["fewshot_config"]["sampler"] == upstream["fewshot_config"]["sampler"] == "first_n"
    source = ast.parse((UPSTREAM / "utils.py").read_text())
    (fn,) = [n for n in source.body if isinstance(n, ast.FunctionDef) and n.name == "list_fewshot_samples"]
    assert mbpp_utils.list_fewshot_samples() == ast.literal_eval(fn.body[0].value)


@pytest.mark.parametrize("code,expected", [(DOCS[0]["code"], 1.0), ("def remove_Occ(s, ch):\n    return s", 0.0)])
def test_pass_at_1_runs_candidate_then_tests_in_the_sandbox(code, expected):
    assert mbpp_utils.pass_at_1("\n".join(DOCS[0]["test_list"]), [code]) == expected


def test_mbpp_from_a_local_file_end_to_end(debug_models, tmp_path):
    data = tmp_path / "mbpp.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    report = run_eval(EvalSettings(tasks=["mbpp"], data=[f"mbpp={data}"], max_new_tokens=4, out=str(tmp_path / "o")),
                      model=debug_models["debug-llama"])
    (row,) = report.rows
    assert (row.task, row.metric, row.value, row.samples) == ("mbpp", "pass_at_1", 0.0, 1)
    (sample,) = [json.loads(line) for line in report.sample_paths[0].read_text().splitlines()]
    prompt = sample["arguments"][0][0]
    assert prompt.startswith("You are an expert Python programmer, and here is your task: Write a function to find "
                             "the similar elements") and prompt.count("[DONE]") == 3 and prompt.endswith("[BEGIN]\n")
    assert report.sample_paths[0].with_suffix(".executions.jsonl").is_file()
