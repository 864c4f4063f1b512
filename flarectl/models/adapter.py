"""FlareModel: the one model interface the objective, the samplers and the engine use.

It wraps an HF causal LM (Llama/Qwen2/Qwen3 full attention, or the Qwen3.5 hybrid) and runs its layers itself so
that a caller can give any ``StreamLayout`` (two-stream training, decoding windows) and a ``HybridCache``. The HF
modules provide the weights and the pure per-token parts (norms, MLPs, projections, rotary tables); attention and
Gated DeltaNet mixing are flarectl's own (``attention.py``, ``gdn.py``).
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flarectl.models.attention import attention_mixer
from flarectl.models.cache import AttentionCache, GDNCache, HybridCache
from flarectl.models.gdn import gdn_mixer
from flarectl.models.layout import StreamLayout, add_self_for_padding, visibility

ATTENTION, GDN = "attention", "gdn"
HYBRID_TYPES = {"qwen3_5", "qwen3_5_text"}
FULL_ATTENTION_TYPES = {"llama", "qwen2", "qwen3", "mistral"}
SUPPORTED_TYPES = HYBRID_TYPES | FULL_ATTENTION_TYPES


@dataclass(frozen=True)
class FlareMeta:
    """FLARE settings recorded in a checkpoint's config.json under ``flare``."""

    mask_token_id: int
    block_size: int


def _dispatching_forward(module: nn.Module, *args, flare_step=None, **kwargs):
    """A decoder layer's forward: ``layer(h, flare_step=f)`` runs ``f(h)`` (flarectl's own layer step), anything
    else runs the layer's HF forward unchanged."""
    if flare_step is not None:
        return flare_step(*args)
    return type(module).forward(module, *args, **kwargs)


def route_flare_steps(layer: nn.Module) -> None:
    """Let ``layer(h, flare_step=f)`` run ``f`` inside the layer's ``__call__``, so that forward hooks on the layer
    (FSDP's unshard/reshard, profilers) fire for flarectl's forwards too. HF's own forward is unaffected."""
    if "forward" not in layer.__dict__:
        layer.forward = types.MethodType(_dispatching_forward, layer)


class FlareModel(nn.Module):
    """Adapter around an HF causal LM. ``forward(input_ids, layout, cache)`` -> logits [B, L, V]."""

    def __init__(self, hf_model: nn.Module, tokenizer=None, *, attn_backend: str = "auto", gdn_backend: str = "auto"):
        super().__init__()
        self.hf = hf_model
        self.tokenizer = tokenizer
        cfg = hf_model.config
        self.model_type = cfg.model_type
        if self.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported architecture {self.model_type}")
        self.family = "qwen3_5" if self.model_type in HYBRID_TYPES else "llama"
        types_ = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
        self.layer_kinds = [GDN if t == "linear_attention" else ATTENTION for t in types_]
        self.attn_backend = attn_backend
        self.gdn_backend = gdn_backend
        self.gradient_checkpointing = False
        for layer in self.layers:
            route_flare_steps(layer)

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def flare_meta(self) -> FlareMeta | None:
        meta = getattr(self.config, "flare", None)
        return FlareMeta(int(meta["mask_token_id"]), int(meta["block_size"])) if meta else None

    @property
    def _no_split_modules(self) -> list[str]:
        """Decoder layer class names: the units FSDP's transformer auto-wrap shards one by one."""
        return sorted({type(layer).__name__ for layer in self.layers})

    @property
    def layers(self) -> nn.ModuleList:
        return self.hf.model.layers

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.hf.parameters())

    # -- caches -------------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int) -> HybridCache:
        """Empty cache for ``batch_size`` rows of up to ``capacity`` tokens."""
        cache = HybridCache(lengths=torch.zeros(batch_size, dtype=torch.long, device=self.device), capacity=capacity)
        for i, (kind, layer) in enumerate(zip(self.layer_kinds, self.layers)):
            if kind == ATTENTION:
                attn = layer.self_attn
                n_kv = attn.k_proj.out_features // attn.head_dim
                shape = (batch_size, n_kv, capacity, attn.head_dim)
                cache.attention[i] = AttentionCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                                                    torch.zeros(shape, dtype=self.dtype, device=self.device))
            else:
                m = layer.linear_attn
                state = torch.zeros(batch_size, m.num_v_heads, m.head_k_dim, m.head_v_dim, device=self.device,
                                    dtype=torch.promote_types(self.dtype, torch.float32))
                conv = torch.zeros(batch_size, m.conv_dim, m.conv_kernel_size - 1, dtype=self.dtype, device=self.device)
                cache.gdn[i] = GDNCache(state, conv)
        return cache

    # -- forward ------------------------------------------------------------------------------------------------
    def _attn_backend(self) -> str:
        if self.attn_backend == "auto":
            # SDPA with the explicit mask everywhere: flex_attention is compiled per sequence length, and packed
            # training batches change length every step (measured on an H100: recompiles made SmolLM2 conversion
            # steps take many seconds). flex stays selectable (model.attn_backend: flex) for fixed-length work.
            return "sdpa"
        return self.attn_backend

    def _rope(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        if self.family == "qwen3_5" and position_ids.dim() == 2:
            # Qwen3.5's rotary module is multimodal (3, B, L); transformers 5.17 (the GPU image) does not expand 2-D
            # position ids itself (5.2x does). Text-only: the three rows are equal, so this is plain RoPE.
            position_ids = position_ids[None].expand(3, -1, -1)
        cos, sin = self.hf.model.rotary_emb(hidden, position_ids)
        return cos, sin

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        layout: StreamLayout | None = None,
        cache: HybridCache | None = None,
        *,
        commit_all: bool = True,
    ) -> torch.Tensor:
        """Final-norm hidden states [B, L, hidden] for ``input_ids`` [B, L] under ``layout``.

        Without a layout the tokens are one causal document per row continuing the cache (if any). With a cache,
        clean tokens extend each row at positions ``cache.lengths[row] + ...``; if ``commit_all`` they are committed
        by this call, otherwise they stay pending for ``cache.commit(n)``.
        """
        bsz, length = input_ids.shape
        if layout is None:
            start = cache.lengths if cache is not None else 0
            layout = StreamLayout.causal(bsz, length, start, device=input_ids.device)
        hidden = self.hf.model.embed_tokens(input_ids)
        rope = self._rope(hidden, layout.position_ids)
        backend = self._attn_backend() if cache is None else "sdpa"
        mask = None
        if backend == "sdpa" and ATTENTION in self.layer_kinds:
            mask = add_self_for_padding(visibility(layout, layout), layout)
        if cache is not None:
            cache.pending = int(layout.is_clean.sum(1).max()) if length else 0

        for i, (kind, layer) in enumerate(zip(self.layer_kinds, self.layers)):
            def run_layer(h, layer=layer, kind=kind, i=i):
                x = layer.input_layernorm(h)
                if kind == ATTENTION:
                    x = attention_mixer(layer.self_attn, x, rope, layout, i, gated=self.family == "qwen3_5",
                                        cache=cache, mask=mask, backend=backend)
                else:
                    x = gdn_mixer(layer.linear_attn, x, layout, i, cache=cache, commit_all=commit_all,
                                  backend=self.gdn_backend)
                h = h + x
                return h + layer.mlp(layer.post_attention_layernorm(h))

            # Through the layer's own __call__ (its forward dispatches to run_layer): module hooks fire, which is
            # what FSDP's per-layer unshard/reshard relies on.
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpoint(lambda h, layer=layer, step=run_layer: layer(h, flare_step=step), hidden,
                                    use_reentrant=False)
            else:
                hidden = layer(hidden, flare_step=run_layer)

        if cache is not None and commit_all:
            cache.lengths = cache.lengths + layout.is_clean.sum(1)
            cache.pending = 0
        return self.hf.model.norm(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        layout: StreamLayout | None = None,
        cache: HybridCache | None = None,
        *,
        commit_all: bool = True,
        loss_fn=None,
    ) -> torch.Tensor:
        """Logits [B, L, V] (see ``hidden_states``). ``model(loss_fn=f)`` instead returns ``f(model)``: a training
        loss computed inside this module's ``__call__``, so that a wrapper's hooks (FSDP's root unshard) cover it."""
        if loss_fn is not None:
            return loss_fn(self)
        return self.hf.lm_head(self.hidden_states(input_ids, layout, cache, commit_all=commit_all))
