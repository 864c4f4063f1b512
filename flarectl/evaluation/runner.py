"""``flarectl eval``: run lm-eval tasks x decoding modes on one model; return rows, write JSON and samples.

One ``lm_eval.simple_evaluate`` call per task x mode (so tokens/forward and tokens/s belong to one task and one
mode), all on one loaded model. Output directory::

    results.json                   settings, one row per task x mode x metric, lm-eval's configs and versions
    samples/<task>__<mode>.jsonl   lm-eval's logged samples (prompt, raw and filtered responses, metrics)
    samples/<task>__<mode>.executions.jsonl   code tasks: each sandboxed run's status (passed, failed, timeout,
                                   crashed, oom), exit code, seconds and stderr tail
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from flarectl.decoding import MODES
from flarectl.errors import FlareError
from flarectl.evaluation.humaneval import take_executions
from flarectl.evaluation.task_specs import ResolvedTask, TaskError, parse_data_args, resolve_tasks, task_manager
from flarectl.outputs import prepare_output_dir


@dataclass
class EvalSettings:
    """Everything ``flarectl eval`` was asked; ``max_new_tokens`` None keeps each task's ``max_gen_toks``.

    ``seed`` seeds flarectl's sampler only; lm-eval keeps its default seeds (few-shot choice as in its own runs).
    """

    tasks: list[str]
    model: str = "smollm2-135m-instruct"
    modes: list[str] = field(default_factory=lambda: ["ar"])
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 1
    data: list[str] = field(default_factory=list)
    max_new_tokens: int | None = None
    block_size: int | None = None
    threshold: float = 0.9
    diffusion_scheme: str = "anchored"
    seed: int = 0
    apply_chat_template: bool = False
    device: str | None = None
    out: str | None = None


@dataclass
class EvalRow:
    """One metric of one task in one mode; ``stderr`` None where lm-eval gives none."""

    task: str
    mode: str
    metric: str
    filter: str
    value: float
    stderr: float | None
    samples: int
    tokens_per_forward: float | None
    tokens_per_second: float | None
    seconds: float


@dataclass
class EvalReport:
    """``replaced``: what ``out_dir`` already held that this run wrote over (``results.json``, ``samples``)."""

    rows: list[EvalRow]
    out_dir: Path
    results_path: Path
    sample_paths: list[Path]
    replaced: list[str] = field(default_factory=list)


def validate(s: EvalSettings) -> None:
    """Raise a one-line `FlareError` for bad option values."""
    if not s.tasks:
        raise FlareError("give at least one task, e.g. `flarectl eval humaneval`")
    bad = [m for m in s.modes if m not in MODES]
    if bad or not s.modes:
        raise FlareError(f"--mode must be a comma list of {', '.join(MODES)}, got '{','.join(s.modes)}'")
    checks = [(s.limit is not None and s.limit < 1, f"--limit must be >= 1, got {s.limit}"),
              (s.num_fewshot is not None and s.num_fewshot < 0, f"--num-fewshot must be >= 0, got {s.num_fewshot}"),
              (s.batch_size < 1, f"--batch-size must be >= 1, got {s.batch_size}"),
              (s.max_new_tokens is not None and s.max_new_tokens < 1,
               f"--max-new-tokens must be >= 1, got {s.max_new_tokens}"),
              (s.block_size is not None and not 1 <= s.block_size <= 64,
               f"--block-size must be between 1 and 64, got {s.block_size}"),
              (not 0 < s.threshold <= 1, f"--threshold must be in (0, 1], got {s.threshold}"),
              (s.diffusion_scheme not in ("anchored", "plain"),
               f"--diffusion-scheme must be anchored or plain, got '{s.diffusion_scheme}'")]
    for failed, message in checks:
        if failed:
            raise FlareError(message)


def run_eval(s: EvalSettings, model=None, on_done: Callable[[list[EvalRow]], None] | None = None) -> EvalReport:
    """Evaluate ``s.tasks`` in every mode of ``s.modes``. ``model``: an already loaded ``FlareModel`` (else
    ``s.model`` is loaded). ``on_done(rows)`` is called after each task x mode."""
    validate(s)
    data = parse_data_args(s.data)
    manager = task_manager(s.tasks)
    resolved = resolve_tasks(s.tasks, data, manager)
    out_dir = Path(s.out or f"runs/eval/{time.strftime('%Y%m%d-%H%M%S')}").expanduser()
    replaced = prepare_output_dir(out_dir, ["results.json"], ["samples"])  # before the model loads or a task runs
    if model is None:
        from flarectl.models.loading import load_model

        model = load_model(s.model, device=s.device)
    from flarectl.evaluation.lm import FlareLM, GenerationStats

    lms = {mode: FlareLM(model, mode=mode, batch_size=s.batch_size, block_size=s.block_size,
                         threshold=s.threshold, diffusion_scheme=s.diffusion_scheme, seed=s.seed)
           for mode in s.modes}  # validates modes vs the model
    rows, runs, sample_paths = [], [], []
    for task in resolved:
        for mode, lm in lms.items():
            lm.stats = GenerationStats()
            take_executions()
            started = time.perf_counter()
            result = _evaluate(lm, task, manager, s)
            seconds = time.perf_counter() - started
            executions = take_executions()
            new = _rows(task, mode, result, lm.stats, seconds)
            rows.extend(new)
            runs.append({"task": task.name, "mode": mode, "lm_eval_task": task.lm_eval_name, "source": task.source,
                         "data": task.data, "seconds": seconds, "generation": lm.stats.as_dict(),
                         "executions": dict(Counter(e["status"] for e in executions)),
                         "results": result["results"], "configs": result.get("configs", {}),
                         "versions": result.get("versions", {}), "n-samples": result.get("n-samples", {})})
            sample_paths.append(_write_samples(out_dir, task, mode, result, executions))
            results_path = out_dir / "results.json"  # rewritten after every task x mode: a crash keeps the rest
            results_path.write_text(json.dumps({"settings": asdict(s), "model": _model_info(model),
                                                "rows": [asdict(r) for r in rows], "runs": runs},
                                               indent=2, default=_json_default))
            if on_done is not None:
                on_done(new)
    return EvalReport(rows, out_dir, results_path, sample_paths, replaced)


def _evaluate(lm, task: ResolvedTask, manager, s: EvalSettings) -> dict[str, Any]:
    import lm_eval
    import lm_eval.evaluator

    if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
        lm_eval.evaluator.get_git_commit_hash = _git_hash_quietly

    try:
        result = lm_eval.simple_evaluate(
            model=lm, tasks=[task.spec], num_fewshot=s.num_fewshot, limit=s.limit, task_manager=manager,
            gen_kwargs={"max_gen_toks": s.max_new_tokens} if s.max_new_tokens else None, log_samples=True,
            apply_chat_template=s.apply_chat_template, confirm_run_unsafe_code=True)  # lm-eval's default seeds
    except (ConnectionError, OSError) as exc:
        if task.source != "hub":
            raise
        raise TaskError(f"task '{task.name}' could not fetch its data from the hub ({type(exc).__name__}); pass a "
                        f"local copy with --data {task.name}=PATH.jsonl") from None
    except Exception as exc:  # noqa: BLE001 - only a local file's errors are the user's; the rest propagate
        if task.source != "local" or not _data_error(exc):
            raise
        files = ", ".join(str(v) for v in task.data.values())
        raise TaskError(f"task '{task.name}': --data {files} does not fit the task ({_first_line(exc)}); it needs "
                        f"JSONL with the task's fields") from None
    return result


def _data_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) comes from reading or templating a data file: a datasets or pyarrow
    parse error, a Jinja template naming a field the file lacks, undecodable bytes."""
    names = ("DatasetGenerationError", "ArrowInvalid", "UndefinedError", "TemplateError", "UnicodeDecodeError",
             "JSONDecodeError")
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if {c.__name__ for c in type(exc).__mro__} & set(names):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _git_hash_quietly() -> str | None:
    """lm-eval records the working directory's git commit; its own call lets git print "fatal: not a git
    repository" on stderr outside one. The same answer, silently."""
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _rows(task: ResolvedTask, mode: str, result: dict[str, Any], stats, seconds: float) -> list[EvalRow]:
    """lm-eval's ``results[task]`` keys ``"metric,filter"`` / ``"metric_stderr,filter"`` -> rows."""
    rows = []
    for lm_name, metrics in result["results"].items():
        n = result.get("n-samples", {}).get(lm_name, {}).get("effective", 0)
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(EvalRow(task.name if lm_name == task.lm_eval_name else lm_name, mode, metric, filt,
                                float(value), float(stderr) if isinstance(stderr, (int, float)) else None, n,
                                stats.tokens_per_forward, stats.tokens_per_second, seconds))
    return rows


def _write_samples(out_dir: Path, task: ResolvedTask, mode: str, result: dict[str, Any],
                   executions: list[dict[str, Any]]) -> Path:
    """lm-eval's samples, plus (code tasks) every sandboxed execution's outcome beside them."""
    path = out_dir / "samples" / f"{task.name}__{mode}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for lm_name, samples in result.get("samples", {}).items():
            for sample in samples:
                handle.write(json.dumps({"task": lm_name, **sample}, default=_json_default) + "\n")
    if executions:
        path.with_suffix(".executions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in executions))
    return path


def _model_info(model) -> dict[str, Any]:
    meta = model.flare_meta
    return {"name_or_path": str(getattr(model.hf.config, "_name_or_path", "")), "model_type": model.model_type,
            "parameters": model.num_parameters(), "dtype": str(model.dtype), "device": str(model.device),
            "flare": asdict(meta) if meta else None}


def _json_default(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(obj)
