"""Recipes: YAML -> frozen, typed dataclasses.

A recipe is a YAML mapping whose keys mirror the ``Recipe`` dataclass tree. Unknown keys are rejected with the
full key path and the closest valid key; values are type-checked; ``key.path=value`` overrides (values parsed as
YAML) apply on top. Shipped recipes live in ``recipes/`` (package data ``flarectl.recipes``) and are addressed by
name (``--recipe debug``); any other value is read as a path.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from flarectl.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how."""

    name: str = DEFAULT_MODEL
    """Preset name (see `flarectl models`), hub id, or local directory."""
    random_init: bool = False
    """Build the architecture with random weights instead of loading them (presets of real shapes, benchmarks)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Parameter dtype; auto = bfloat16 on CUDA, float32 on CPU."""
    attn_backend: Literal["auto", "sdpa", "flex"] = "auto"
    """Softmax-attention implementation for masked (two-stream) forwards; auto = sdpa with an explicit mask (flex is
    compiled per sequence length: only worth it when every batch has the same length)."""
    gdn_backend: Literal["auto", "fused", "reference", "simple"] = "auto"
    """Two-stream Gated DeltaNet kernels; auto = fused on CUDA, reference (pure torch) on CPU."""


@dataclass(frozen=True)
class FlareConfig:
    """Block-diffusion settings stored in the checkpoint's metadata."""

    block_size: int = 4
    """Tokens per diffusion block B (the paper ships B=4)."""
    mask_token: str = "<|mask|>"
    """Mask token text; added to the tokenizer and embeddings if the model has none."""


@dataclass(frozen=True)
class ObjectiveConfig:
    """Training objective."""

    kind: Literal["flare", "block-diffusion", "ar"] = "flare"
    """flare = clean causal stream + complementary noisy views (the method); block-diffusion = noisy views only
    (the paper's first ablation row); ar = plain next-token SFT (the paper's data-screening proxy)."""
    mask_schedule: Literal["uniform", "position"] = "uniform"
    """uniform: each block draws a mask ratio t ~ U(min_mask_ratio, 1) and masks each position w.p. t;
    position: positions later in the block are masked more often (ratio ramps up across the block)."""
    min_mask_ratio: float = 0.0
    """Lower bound of the per-block mask ratio."""
    ar_weight: float = 1.0
    """Weight of the clean-stream next-token loss (1 = the paper's unit weight)."""
    diffusion_weight: float = 1.0
    """Weight of the noisy-stream denoising loss (1 = the paper's unit weight)."""


@dataclass(frozen=True)
class DataConfig:
    """Training data."""

    sources: tuple[str, ...] = ("default",)
    """Hub dataset ids (`ORG/NAME[:config][@split]`), local files (.json/.jsonl/.parquet), or `default`
    (the offline default transfer set)."""
    max_seq_len: int = 512
    """Packed sequence length (tokens per row of the clean stream)."""
    on_bad_record: Literal["error", "skip"] = "skip"
    """error: stop at the first bad record; skip: count, report and skip bad records."""
    overlong: Literal["skip", "truncate"] = "skip"
    """What to do with documents longer than max_seq_len."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping."""

    seed: int = 0
    micro_batch_size: int = 1
    """Packed rows per device per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    max_steps: int = 100
    """Optimizer steps."""
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine/linear)."""
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"
    """auto = bf16 on CUDA, none on CPU."""
    log_every: int = 1
    save_every: int = 0
    """Save a resumable checkpoint every N steps (0 = only at the end)."""
    output_dir: str = "runs/flare"


@dataclass(frozen=True)
class DecodeConfig:
    """Default decoding settings."""

    mode: Literal["ar", "ar-trust", "diffusion-trust"] = "ar"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    threshold: float = 0.9
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    """A whole recipe."""

    name: str = "custom"
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    flare: FlareConfig = field(default_factory=FlareConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


# ----------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, strictly.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return build(tp, value, path)
    if origin is Literal:
        if isinstance(value, bool) and value not in args:
            # YAML 1.1 reads a bare no/off/yes/on as a boolean: map it back to the spelling the choices use
            spellings = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((a for a in args if isinstance(a, str) and a.lower() in spellings), value)
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: {value!r} is not a {_type_name(tp)}")
    if origin is tuple:
        if isinstance(value, str) and args and args[-1] is Ellipsis:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string; accept plain float syntax
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _unknown_key(cls: type, key: str, path: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    where = f"{path}.{key}" if path else key
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown recipe key '{where}'{hint}")


def build(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints or key not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown_key(cls, str(key), path)
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain data (tuples become lists), for YAML/JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------------------------
# Recipes on disk and overrides.


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every recipe shipped with flarectl (package data ``flarectl.recipes`` when installed; the
    repository's ``recipes/`` when flarectl runs from a source tree that was not pip-installed)."""
    try:
        root = resources.files("flarectl.recipes")
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parent.parent / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 0.0001). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value, e.g. train.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key; use key.path=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(keys)}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def load_recipe(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a shipped recipe by name, or a YAML file by path, then apply ``key=value`` overrides."""
    data: dict = {}
    if name_or_path:
        shipped = shipped_recipes()
        if name_or_path in shipped:
            data = _read_yaml(shipped[name_or_path])
        else:
            path = Path(name_or_path)
            if not path.is_file():
                names = ", ".join(sorted(shipped))
                raise ConfigError(f"recipe '{name_or_path}' is neither a shipped recipe ({names}) nor a file")
            data = _read_yaml(path)
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(data, keys, value)
    recipe = build(Recipe, data)
    validate(recipe)
    return recipe


def replace(recipe: Recipe, **sections: dict) -> Recipe:
    """Return a copy with some fields of some sections replaced, e.g. replace(r, train={'max_steps': 3})."""
    data = to_dict(recipe)
    for section, values in sections.items():
        for key, value in values.items():
            _set_path(data, [section, key], value)
    new = build(Recipe, data)
    validate(new)
    return new


def validate(recipe: Recipe) -> None:
    """Cross-field checks that types alone cannot express."""
    if not 1 <= recipe.flare.block_size <= 64:
        raise ConfigError(f"flare.block_size must be between 1 and 64, got {recipe.flare.block_size}")
    if not 0.0 <= recipe.objective.min_mask_ratio < 1.0:
        raise ConfigError("objective.min_mask_ratio must be in [0, 1)")
    if recipe.data.max_seq_len < 8:
        raise ConfigError("data.max_seq_len must be at least 8")
    if recipe.train.micro_batch_size < 1 or recipe.train.grad_accum < 1 or recipe.train.max_steps < 1:
        raise ConfigError("train.micro_batch_size, train.grad_accum and train.max_steps must be >= 1")
    if recipe.train.lr <= 0:
        raise ConfigError("train.lr must be positive")
    if not 0.0 < recipe.decode.threshold <= 1.0:
        raise ConfigError("decode.threshold must be in (0, 1]")


def save_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe as YAML."""
    path.write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
