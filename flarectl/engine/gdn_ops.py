"""The GDN layer's decode ops for the engine's static step (issue 6): the recurrence (``flarectl::gdn_recurrence_commit``
/ ``_from``: the engine's Triton kernel ``recurrence.py`` on CUDA, fla's kernel on request, a torch loop elsewhere) and
the whole mixer — conv, gates, recurrence, gated norm — as one op (``flarectl::gdn_mixer``: ``mixer.py``'s kernel on
CUDA, its twin ``gdn_mixer_chain`` in torch elsewhere), with the choice of decode path (``resolve_gdn_kernel``).
``static_step.gdn_block`` calls them."""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from flarectl.models.gdn import _l2norm, _step

def _conv_taps(inputs: torch.Tensor, weight: torch.Tensor, bias, n_out: int, dt: torch.dtype) -> torch.Tensor:
    """Depthwise causal conv + SiLU as a sum over the taps: inputs [C, k-1+n, D] (left context first), weight
    [D, k] -> [C, n, D] in ``dt``. Same values as ``gdn._conv`` (F.conv1d), but pointwise (fuses when compiled)."""
    taps = weight.shape[-1]
    if n_out == 0:
        return inputs.new_zeros(inputs.shape[0], 0, inputs.shape[-1], dtype=dt)
    x, w = inputs[:, -(n_out + taps - 1):].to(dt), weight.to(dt)
    out = x[:, :n_out] * w[:, 0]
    for j in range(1, taps):
        out = out + x[:, j:j + n_out] * w[:, j]
    if bias is not None:
        out = out + bias.to(dt)
    return F.silu(out)


# -- the GDN recurrence as one op -----------------------------------------------------------------------------------

def torch_recurrence(state, q, k, v, g, beta):
    """Gated delta rule over T tokens (pure torch). state [C,HV,K,V]; q,k [C,T,HV,K] (normalised, scaled);
    v [C,T,HV,V]; g, beta [C,T,HV] -> (outputs [C,T,HV,V], final state)."""
    outs = []
    for t in range(q.shape[1]):
        state, o = _step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        outs.append(o)
    if not outs:
        return v.new_zeros(v.shape), state
    return torch.stack(outs, 1), state


def _recurrence_torch(q, k, v, g, beta, initial, final, scale):
    r = v.shape[2] // q.shape[2]
    q, k = _l2norm(q) * scale, _l2norm(k)
    if r > 1:
        q, k = q.repeat_interleave(r, dim=-2), k.repeat_interleave(r, dim=-2)
    o, state = torch_recurrence(initial, q, k, v, g, beta)
    if final is not None:
        final.copy_(state)
    return o.to(v.dtype)


_FLA_DIRECT = [True]  # call fla's kernel with our own final-state buffer; off after the first failure


def _recurrence_fla(q, k, v, g, beta, initial, final, scale):
    """fla's fused recurrent kernel (0.6.0) launched directly so that the final state lands in ``final`` (no extra
    allocation and copy); the public API (plus a copy) if that kernel's signature ever changes."""
    q, k, v, g, beta, initial = (t.contiguous() for t in (q, k, v, g, beta, initial))
    if q.shape[1] == 0:
        if final is not None:
            final.copy_(initial)
        return torch.zeros_like(v)
    if _FLA_DIRECT[0]:
        try:
            import triton
            from fla.ops.gated_delta_rule.fused_recurrent import fused_recurrent_gated_delta_rule_fwd_kernel as kern

            B, T, H, K = k.shape
            HV, V = v.shape[2], v.shape[3]
            BK, BV = triton.next_power_of_2(K), min(8, triton.next_power_of_2(V))
            o = torch.empty_like(v)
            kern[(triton.cdiv(V, BV) * B * HV,)](
                q=q, k=k, v=v, g=g, gk=None, gv=None, beta=beta, A_log=None, dt_bias=None, o=o, h0=initial,
                ht=final, cu_seqlens=None, scale=scale, T=T, H=H, HV=HV, K=K, V=V, BK=BK, BV=BV,
                USE_QK_L2NORM_IN_KERNEL=True, IS_BETA_HEADWISE=True, STATE_V_FIRST=False, APPLY_BETA_SIGMOID=False,
                ALLOW_NEG_EIGVAL=False, num_warps=1, num_stages=3)
            return o
        except Exception as exc:  # noqa: BLE001 - another fla version: its public API below
            warnings.warn(f"fla fused-recurrent kernel not callable directly ({exc}); using its public API")
            _FLA_DIRECT[0] = False
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    o, ht = fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, scale=scale, initial_state=initial,
                                             output_final_state=final is not None, use_qk_l2norm_in_kernel=True)
    if final is not None:
        final.copy_(ht)
    return o


def _recurrence(q, k, v, g, beta, initial, final, scale, kernel):
    if kernel == "fla":
        return _recurrence_fla(q, k, v, g, beta, initial, final, scale)
    return _recurrence_torch(q, k, v, g, beta, initial, final, scale)


def _from_rows(state, last, commit):
    """Per row: ``state`` where ``commit`` else ``last`` (the state after a step's clean tokens)."""
    return torch.where(commit[:, None, None, None], state, last)


@torch.library.custom_op("flarectl::gdn_recurrence_commit", mutates_args=("state", "last"))
def gdn_recurrence_commit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          state: torch.Tensor, last: torch.Tensor, commit: torch.Tensor, scale: float,
                          kernel: str) -> torch.Tensor:
    """Gated delta rule over T tokens from ``state`` [C,HV,K,V] (the cache). q,k [C,T,H,K] raw (L2-normalised and q
    scaled by ``scale`` here; HV a multiple of H, v-head j reads k-head j // (HV/H)); v [C,T,HV,V]; g (log decay),
    beta [C,T,HV]; commit [C] bool. Returns o [C,T,HV,V] (v's dtype). The state after the T tokens goes into
    ``state`` for rows with ``commit`` and into ``last`` for the others (whose ``state`` is left as it was);
    ``last`` of a committing row is unspecified. kernel: 'triton' (``recurrence.py``: each row's state stored once,
    where it belongs), 'fla' (fla's kernel writes ``last`` for every row, then a ``where`` pass commits) or 'torch'
    (the twin, same passes as 'fla')."""
    if kernel == "triton":
        from flarectl.engine import recurrence

        return recurrence.launch(q, k, v, g, beta, state, last, commit, scale, 0)
    dt = torch.promote_types(v.dtype, torch.float32)
    o = _recurrence(q, k, v, g, beta, state.to(dt), last, scale, kernel)
    state.copy_(_from_rows(last, state, commit))
    return o


@gdn_recurrence_commit.register_fake
def _(q, k, v, g, beta, state, last, commit, scale, kernel):
    return torch.empty_like(v)


@torch.library.custom_op("flarectl::gdn_recurrence_from", mutates_args=())
def gdn_recurrence_from(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                        state: torch.Tensor, last: torch.Tensor, commit: torch.Tensor, scale: float,
                        kernel: str) -> torch.Tensor:
    """A window's recurrence (no state kept) from each row's state after the step's clean tokens: ``state`` for
    rows with ``commit``, ``last`` for the others (as ``gdn_recurrence_commit`` left them)."""
    if kernel == "triton":
        from flarectl.engine import recurrence

        return recurrence.launch(q, k, v, g, beta, state, last, commit, scale, 1)
    dt = torch.promote_types(v.dtype, torch.float32)
    return _recurrence(q, k, v, g, beta, _from_rows(state, last, commit).to(dt), None, scale, kernel)


@gdn_recurrence_from.register_fake
def _(q, k, v, g, beta, state, last, commit, scale, kernel):
    return torch.empty_like(v)


GDN_KERNELS = ("auto", "torch", "fla", "triton", "mixer")

MIXER_DEFAULT = True
"""Whether 'auto' picks 'mixer' on CUDA (env ``FLARECTL_ENGINE_MIXER=1`` / ``0`` overrides). On since session 6: on the
H100 the one-kernel mixer made the AR step faster (2.51 -> 2.35 ms at C=8, run 7) and the engine's CUDA tests pass
with it as the default (session 6 run 1: 8 passed). Its bf16 logits are not bitwise those of the 'triton' chain
(rel 3.9e-2, argmax equal) but equally far from an fp32 reference (5.37e-2 vs 5.29e-2, run 9); fp32 equal to 1e-5."""


def resolve_gdn_kernel(kernel: str, device: torch.device) -> str:
    """'auto' -> on CUDA when triton imports: 'triton' (the engine's own recurrence kernel, ``recurrence.py``), or
    'mixer' (the whole GDN mixer in one Triton kernel, ``mixer.py``; layers without fused projections take the
    'triton' recurrence) when ``MIXER_DEFAULT`` is on or ``FLARECTL_ENGINE_MIXER=1``; else 'torch'.
    'fla': fla's fused recurrent kernel plus a ``where`` commit pass (the earlier default)."""
    if kernel != "auto":
        if kernel not in GDN_KERNELS:
            raise ValueError(f"gdn kernel must be one of {GDN_KERNELS}; got {kernel!r}")
        return kernel
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - triton missing or broken: the torch recurrence is always there
        return "torch"
    env = os.environ.get("FLARECTL_ENGINE_MIXER")
    on = MIXER_DEFAULT if env is None else env.strip().lower() not in ("0", "false", "no", "off", "")
    return "mixer" if on else "triton"


# -- the whole GDN mixer (conv, gates, recurrence, gated norm) as one op ---------------------------------------------

def _conv_context(ctx: torch.Tensor, n: torch.Tensor, span: int) -> torch.Tensor:
    """The conv context after each row's first ``n`` clean tokens: ctx [C, span+Wc, D] (conv state, then the clean
    inputs) -> [C, span, D]."""
    idx = n[:, None] + torch.arange(span, device=ctx.device)[None]
    return ctx.gather(1, idx[:, :, None].expand(-1, -1, ctx.shape[-1]))


def _state_after(q, k, v, g, beta, state, seen, commit, wc: int, scale: float, kernel: str) -> torch.Tensor:
    """[C, HV, K, V] fp32: each row's GDN state after its first ``seen`` clean tokens (the start state of a window
    anchored inside the clean tokens), from the cache ``state`` before the step commits anything. A recurrence of
    its own over the clean tokens (the chain's way; the one-kernel mixer keeps it on chip instead)."""
    real = (torch.arange(wc, device=q.device)[None] < seen[:, None])[..., None]
    out = torch.empty_like(state)
    gdn_recurrence_commit(q, k, v, g * real, beta * real, state, out, torch.zeros_like(commit), scale, kernel)
    return out


def conv_recurrence(mixed, g, beta, conv_w, conv_b, heads, state, conv, last_state, last_conv, counts, commit,
                    wc: int, scale: float, kernel: str, seen=None) -> torch.Tensor:
    """The GDN mixer's middle in torch ops (``gdn_mixer_chain`` and ``static_step.gdn_block`` share it): the causal
    conv + SiLU over the conv state and the step's tokens (the window over the conv context after the clean tokens
    it sees), the recurrence over the clean tokens (padding: decay 1, no write; the committing rows' state in the
    cache, the others' in ``last_state``), the window's from the state after its ``seen`` clean tokens, and the conv
    context committed. mixed [C, W, 2HK + HV*V]; g, beta [C, W, HV] in the step's compute dtype (``mixed``'s
    promoted to fp32 at least); conv_w [D, S + 1] (``conv_b`` [D] or None); ``heads``: y [..., 2HK + HV*V] ->
    q, k [..., H, K], v [..., HV, V]. Returns the recurrence's output [C, W, HV, V]."""
    wc = int(wc)
    ww = mixed.shape[1] - wc
    dt = g.dtype
    span = conv.shape[-1]
    ctx = torch.cat([conv.transpose(1, 2).to(mixed.dtype), mixed[:, :wc]], 1)  # [C, k-1+Wc, D]
    idx = counts[:, None] + torch.arange(span, device=mixed.device)[None]
    left = ctx.gather(1, idx[:, :, None].expand(-1, -1, ctx.shape[-1]))  # conv context after the clean tokens

    q, k, v = heads(_conv_taps(ctx, conv_w, conv_b, wc, dt))
    real = (torch.arange(wc, device=mixed.device)[None] < counts[:, None])[..., None]  # [C, Wc, 1]
    gc, bc = g[:, :wc] * real, beta[:, :wc] * real  # padding: decay 1, no write
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    w_state = None
    if ww and seen is not None and seen is not counts:  # windows anchored inside the clean tokens
        w_state = _state_after(q, k, v, g[:, :wc], beta[:, :wc], state, seen, commit, wc, scale, kernel)
    core = gdn_recurrence_commit(q, k, v, gc, bc, state, last_state, commit, scale, kernel)
    if ww:
        w_left = left if w_state is None else _conv_context(ctx, seen, span)
        qn, kn, vn = heads(_conv_taps(torch.cat([w_left, mixed[:, wc:]], 1), conv_w, conv_b, ww, dt))
        o_win = gdn_recurrence_from(qn.contiguous(), kn.contiguous(), vn.contiguous(), g[:, wc:].contiguous(),
                                    beta[:, wc:].contiguous(), state if w_state is None else w_state,
                                    last_state if w_state is None else w_state, commit, scale, kernel)
        core = torch.cat([core, o_win], 1)
    last_conv.copy_(left.transpose(1, 2))
    conv.copy_(torch.where(commit[:, None, None], last_conv, conv))
    return core


def gdn_mixer_chain(proj, conv_w, conv_b, A_log, dt_bias, norm_w, state, conv, last_state, last_conv, counts,
                    commit, wc: int, H: int, HV: int, K: int, V: int, eps: float, kernel: str = "torch", seen=None):
    """The static step's GDN mixer as a chain of torch ops (the reference twin of ``gdn_mixer``; ``gdn_block``'s
    chain with its recurrence ``kernel``). proj [C, W, 2HK + HV*V | HV*V (z) | HV (b) | HV (a)] -> [C, W, HV*V].
    ``seen`` [C]: the clean tokens each row's window sees (None: all ``counts``)."""
    C, W, _ = proj.shape
    dt = torch.promote_types(proj.dtype, torch.float32)
    key_dim, value_dim = H * K, HV * V
    mixed, z, b, a = proj.split([2 * key_dim + value_dim, value_dim, HV, HV], -1)
    beta = b.sigmoid()
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias)  # as gdn._gates
    g, beta = g.to(dt), beta.to(dt)
    scale = K ** -0.5

    def heads(y):
        q, k, v = torch.split(y, [key_dim, key_dim, value_dim], dim=-1)
        lead = y.shape[:-1]
        return q.reshape(*lead, H, K), k.reshape(*lead, H, K), v.reshape(*lead, HV, V)

    core = conv_recurrence(mixed, g, beta, conv_w, conv_b, heads, state, conv, last_state, last_conv, counts,
                           commit, wc, scale, kernel, seen)
    o = core.reshape(-1, V).to(proj.dtype).float()  # gated RMSNorm with z: HF's RMSNormGated
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    o = norm_w * o.to(proj.dtype)
    o = o * F.silu(z.reshape(-1, V).float())
    return o.to(proj.dtype).reshape(C, W, value_dim)


@torch.library.custom_op("flarectl::gdn_mixer", mutates_args=("state", "conv", "last_state", "last_conv"))
def gdn_mixer(proj: torch.Tensor, conv_w: torch.Tensor, conv_b: torch.Tensor | None, A_log: torch.Tensor,
              dt_bias: torch.Tensor, norm_w: torch.Tensor, state: torch.Tensor, conv: torch.Tensor,
              last_state: torch.Tensor, last_conv: torch.Tensor, counts: torch.Tensor, commit: torch.Tensor,
              wc: int, H: int, HV: int, K: int, V: int, eps: float, seen: torch.Tensor | None = None,
              l2_a: torch.Tensor | None = None, l2_b: torch.Tensor | None = None) -> torch.Tensor:
    """A GDN layer's mixer over the step's tokens, from the fused input projection's output ``proj`` [C, W, N]
    (per token [q k v (2HK + HV*V) | z (HV*V) | b (HV) | a (HV)]) to the out_proj input [C, W, HV*V] (proj's
    dtype): causal conv (``conv_w`` [D, S+1], ``conv_b``) over the conv state [C, D, S] and the clean tokens, the
    window's over the conv context after each row's ``counts`` clean tokens; SiLU; g, beta from a / ``A_log`` /
    ``dt_bias`` and b; q/k L2 norm and scale K^-0.5; the gated delta rule (padding clean tokens: identity), its
    state after the clean tokens into ``state`` (rows with ``commit``) or ``last_state`` (others), the conv
    context after them into ``last_conv`` and, for committing rows, ``conv``; RMSNormGated(o, z) with ``norm_w``,
    ``eps``. ``seen`` [C] (None: ``counts``): how many clean tokens each row's window sees — ``counts - 1`` anchors
    the window on the last clean token (its conv context and start state are those before that token).
    ``l2_a`` / ``l2_b``: the weights of the GEMMs after the mixer (out_proj, gate|up), which the CUDA kernel may pull
    into L2 while it runs (``mixer.L2_NEXT_KB``; a hint, no value changes). The Triton kernel (``mixer.py``) on CUDA
    or under Triton's interpreter, else the torch chain (``gdn_mixer_chain``)."""
    from flarectl.engine import recurrence

    if recurrence.applies(proj.device):
        from flarectl.engine import mixer

        return mixer.launch(proj, conv_w, conv_b, A_log, dt_bias, norm_w, state, conv, last_state, last_conv,
                            counts, commit, wc, H, HV, K, V, eps, seen=seen, l2_a=l2_a, l2_b=l2_b)
    return gdn_mixer_chain(proj, conv_w, conv_b, A_log, dt_bias, norm_w, state, conv, last_state, last_conv,
                           counts, commit, wc, H, HV, K, V, eps, seen=seen)


@gdn_mixer.register_fake
def _(proj, conv_w, conv_b, A_log, dt_bias, norm_w, state, conv, last_state, last_conv, counts, commit, wc, H, HV,
      K, V, eps, seen=None, l2_a=None, l2_b=None):
    return proj.new_empty(proj.shape[0], proj.shape[1], HV * V)


def mixer_applies(module, w_in) -> bool:
    """The one-kernel mixer needs the fused input projection and HF's RMSNormGated (weight, variance_epsilon)."""
    norm = getattr(module, "norm", None)
    return (w_in is not None and norm is not None and type(norm).__name__.endswith("RMSNormGated")
            and getattr(norm, "activation", "silu") == "silu" and hasattr(norm, "variance_epsilon"))
