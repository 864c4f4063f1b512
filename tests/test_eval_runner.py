"""`flarectl eval`: task resolution offline, local --data tasks with lm-eval's own config, results and samples."""

import json
import os
import subprocess
import sys

import pytest
from lm_eval.api.instance import Instance

from flarectl.errors import FlareError
from flarectl.evaluation.lm import FlareLM
from flarectl.evaluation.runner import EvalSettings, run_eval
from flarectl.evaluation.task_specs import TaskError, parse_data_args, resolve_tasks, task_manager

GSM8K_DOCS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?",
     "answer": "2 * 12 = <<2*12=24>>24 eggs.\n#### 24"},
    {"question": "Sara had 10 dollars and spent 6. How much is left?",
     "answer": "10 - 6 = <<10-6=4>>4 dollars.\n#### 4"},
]


@pytest.fixture()
def gsm8k_file(tmp_path):
    path = tmp_path / "gsm8k_test.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in GSM8K_DOCS))
    return path


@pytest.fixture(scope="module")
def manager():
    return task_manager(["humaneval", "gsm8k", "mbpp"])


def test_offline_resolution_and_one_line_errors(manager, gsm8k_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (he,) = resolve_tasks(["humaneval"], {}, manager)
    assert (he.spec, he.source) == ("flarectl_humaneval", "shipped")
    with pytest.raises(TaskError, match=r"hub is offline.*--data gsm8k=PATH.jsonl"):
        resolve_tasks(["gsm8k"], {}, manager)
    with pytest.raises(TaskError, match=r"unknown task 'gsm8kk' \(did you mean gsm8k"):
        resolve_tasks(["gsm8kk"], {}, manager)
    with pytest.raises(TaskError, match=r"hub is offline.*--data mbpp=PATH.jsonl"):
        resolve_tasks(["mbpp"], {}, manager)
    with pytest.raises(TaskError, match="sandbox"):
        resolve_tasks(["mbpp_instruct"], {}, manager)
    with pytest.raises(TaskError, match="does not exist"):
        parse_data_args([f"gsm8k={gsm8k_file}.missing"])
    with pytest.raises(TaskError, match="NAME=PATH"):
        parse_data_args(["gsm8k"])
    with pytest.raises(TaskError, match="not in the task list"):
        resolve_tasks(["humaneval"], parse_data_args([f"gsm8k={gsm8k_file}"]), manager)


def test_local_data_keeps_lm_eval_config_and_swaps_only_the_data(manager, gsm8k_file, tmp_path):
    data = parse_data_args([f"gsm8k={gsm8k_file}", f"gsm8k:train={gsm8k_file}"])
    (task,) = resolve_tasks(["gsm8k"], data, manager)
    upstream = manager.task_index["gsm8k"].cfg
    assert task.source == "local" and task.spec["task"] == "gsm8k"
    for key in ("doc_to_text", "doc_to_target", "metric_list", "generation_kwargs", "num_fewshot", "filter_list"):
        assert task.spec[key] == upstream[key], key
    assert task.spec["dataset_path"] == "json" and task.spec["fewshot_split"] == "train"
    (same_file,) = resolve_tasks(["gsm8k"], parse_data_args([f"gsm8k={gsm8k_file}"]), manager)
    assert same_file.spec["fewshot_split"] == "test"  # lm-eval then never shows a question as its own example


def test_gsm8k_from_a_local_file_end_to_end(debug_models, gsm8k_file, tmp_path):
    report = run_eval(EvalSettings(tasks=["gsm8k"], data=[f"gsm8k={gsm8k_file}"], modes=["ar"], num_fewshot=1,
                                   max_new_tokens=4, batch_size=3, out=str(tmp_path / "out")),
                      model=debug_models["debug-llama"])
    assert {(r.metric, r.filter) for r in report.rows} == {("exact_match", "strict-match"),
                                                             ("exact_match", "flexible-extract")}
    assert all(r.samples == 3 and r.stderr is not None for r in report.rows)
    samples = [json.loads(line) for line in report.sample_paths[0].read_text().splitlines()]
    for s in samples:
        prompt = s["arguments"][0][0]
        question = s["doc"]["question"]
        assert prompt.endswith(f"Question: {question}\nAnswer:") and prompt.count(question) == 1
        assert prompt.count("Question: ") == 2 and "####" in prompt  # one worked example from another doc
    assert report.replaced == []
    again = run_eval(EvalSettings(tasks=["gsm8k"], data=[f"gsm8k={gsm8k_file}"], modes=["ar"], num_fewshot=0,
                                  max_new_tokens=2, limit=1, out=str(tmp_path / "out")),
                     model=debug_models["debug-llama"])
    assert again.replaced == ["results.json", "samples"]  # the CLI says so


def test_humaneval_ar_trust_greedy_equals_ar_and_outputs_are_written(debug_models, tmp_path):
    report = run_eval(EvalSettings(tasks=["humaneval"], modes=["ar", "ar-trust"], limit=2, max_new_tokens=10,
                                   block_size=4, batch_size=2, out=str(tmp_path / "he")),
                      model=debug_models["debug-llama"])  # hybrid exactness: test_eval_lm (short prompts)
    by_mode = {r.mode: r for r in report.rows}
    assert set(by_mode) == {"ar", "ar-trust"} and by_mode["ar"].metric == "pass@1"
    assert by_mode["ar"].value == by_mode["ar-trust"].value
    assert by_mode["ar"].tokens_per_forward == pytest.approx(1.0)
    responses = {}
    for path in report.sample_paths:
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(lines) == 2
        responses[path.stem.split("__")[1]] = [s["resps"] for s in lines]
    assert responses["ar"] == responses["ar-trust"]
    saved = json.loads(report.results_path.read_text())
    assert len(saved["rows"]) == 2 and saved["runs"][0]["generation"]["requests"] == 2
    assert sum(saved["runs"][0]["executions"].values()) == 2  # one sandboxed program per sample, status counted
    executions = report.sample_paths[0].with_suffix(".executions.jsonl").read_text().splitlines()
    assert [json.loads(e)["entry_point"] for e in executions] == ["has_close_elements", "separate_paren_groups"]


def test_data_that_does_not_fit_the_task_is_one_line(debug_models, tmp_path):
    """A local file without the task's fields, or not JSON text at all: a one-line ``TaskError`` naming the file,
    raised from inside lm-eval's run of the task."""
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"prompt": "what is 2+2"}\n')
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(bytes(range(128, 256)) * 3)
    for path, cause in ((wrong, "UndefinedError"), (binary, "DatasetGenerationError")):
        with pytest.raises(TaskError, match=f"--data {path} does not fit the task \\({cause}") as exc:
            run_eval(EvalSettings(tasks=["gsm8k"], data=[f"gsm8k={path}"], modes=["ar"], max_new_tokens=2,
                                  out=str(tmp_path / "out")), model=debug_models["debug-llama"])
        assert "\n" not in str(exc.value)


def test_out_is_checked_before_anything_runs(tmp_path, monkeypatch):
    """An --out that is a file, or whose samples/ is a file: one line before the model loads or a task runs."""
    from flarectl.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the check"))
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "samples").write_text("")
    for out, message in ((taken, "exists and is not a directory"), (tmp_path / "out", "samples is a file")):
        with pytest.raises(FlareError, match=message):
            run_eval(EvalSettings(tasks=["humaneval"], out=str(out)))
    assert taken.read_text() == "keep me"


def test_settings_are_validated_before_anything_loads():
    for bad in (dict(modes=["fast"]), dict(limit=0), dict(batch_size=0), dict(threshold=1.5), dict(block_size=65),
                dict(diffusion_scheme="fused")):
        with pytest.raises(FlareError):
            run_eval(EvalSettings(tasks=["humaneval"], **bad))


def test_cli_hub_task_offline_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "flarectl.cli", "eval", "gsm8k", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--data gsm8k=PATH.jsonl" in lines[0]
    proc = subprocess.run([sys.executable, "-m", "flarectl.cli", "eval", "humaneval", "--mode", "diffusion-trust",
                           "--diffusion-scheme", "fused", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "--diffusion-scheme must be anchored or plain" in lines[0]


@pytest.mark.slow
def test_embedded_default_runs_humaneval_offline_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report = run_eval(EvalSettings(tasks=["humaneval"], limit=1, max_new_tokens=48, device="cpu",
                                   out=str(tmp_path)))
    (row,) = report.rows
    assert (row.task, row.mode, row.metric, row.samples) == ("humaneval", "ar", "pass@1", 1)
    assert row.tokens_per_forward == pytest.approx(1.0) and row.tokens_per_second > 0


def test_multiple_choice_task_scores_through_loglikelihood(debug_models, tmp_path):
    docs = [{"id": "q1", "question": "Which is a color?", "answerKey": "B",
             "choices": {"text": ["dog", "red", "seven"], "label": ["A", "B", "C"]}},
            {"id": "q2", "question": "What do bees make?", "answerKey": "A",
             "choices": {"text": ["honey", "iron"], "label": ["A", "B"]}}]
    data = tmp_path / "arc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    model = debug_models["debug-llama"]
    report = run_eval(EvalSettings(tasks=["arc_easy"], data=[f"arc_easy={data}"], batch_size=4,
                                   out=str(tmp_path / "o")), model=model)
    assert {r.metric for r in report.rows} == {"acc", "acc_norm"}
    samples = [json.loads(line) for line in report.sample_paths[0].read_text().splitlines()]
    lm = FlareLM(model)
    for s in samples:  # lm-eval's acc = argmax over the choices' log-likelihoods, which come from FlareLM
        choices = s["doc"]["choices"]["text"]
        requests = [Instance("loglikelihood", {}, tuple(args), i) for i, args in enumerate(s["arguments"])]
        expected = [lp for lp, _ in lm.loglikelihood(requests)]
        assert [r[0][0] for r in s["resps"]] == pytest.approx(expected)
        assert s["acc"] == float(max(range(len(choices)), key=expected.__getitem__) == s["target"])
    assert report.rows[0].tokens_per_forward is None  # nothing generated
