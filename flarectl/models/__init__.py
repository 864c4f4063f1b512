"""Model adapters: load HF causal LMs (Qwen3.5 hybrid, Llama/Qwen2/Qwen3) and run them over StreamLayouts."""

from flarectl.models.adapter import ATTENTION, GDN, FlareMeta, FlareModel
from flarectl.models.cache import HybridCache
from flarectl.models.layout import StreamLayout

__all__ = ["ATTENTION", "GDN", "FlareMeta", "FlareModel", "HybridCache", "StreamLayout"]
