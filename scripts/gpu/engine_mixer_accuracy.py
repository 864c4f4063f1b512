"""bf16 accuracy of the engine's GDN paths against an fp32 reference, same random Qwen3.5-2B weights (issue 6).

One AR step at C=8 (context 512, every row commits) through the static step: fp32 with the torch recurrence,
uncompiled and ungraphed (the reference), then the same weights cast to bf16 through each ``--variants`` entry
(gdn_kernel, compiled + graphed as served). Prints the logits' relative error against the reference, the argmax
agreement and the relative difference between the bf16 variants. RANDOM weights.

    python scripts/gpu/engine_mixer_accuracy.py --variants triton,mixer
    python scripts/gpu/engine_mixer_accuracy.py --variants nonorm,norm    # session 7: the fused norm projections
"""

from __future__ import annotations

import argparse
import json

import torch


VARIANTS = {"triton": dict(gdn_kernel="triton"), "mixer": dict(gdn_kernel="mixer"),
            "norm": dict(fuse_norm=True), "nonorm": dict(fuse_norm=False)}
"""Served paths by name (SlotBackend keywords; the rest as the tree's CUDA defaults)."""


def one_step(model, c=8, context=512, steps=3, **kw):
    """Logits [C, V] (fp32) of ``steps`` AR steps (the last one's) from a fresh slot cache at length ``context``."""
    from flarectl.engine.backends import SlotBackend

    be = SlotBackend(model, c, context + 12, **kw)
    dev = model.device
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = None
    with torch.no_grad():
        be.cache.lengths.fill_(context)
        for _ in range(steps):
            ids = torch.randint(0, min(1000, model.config.vocab_size if hasattr(model.config, "vocab_size") else 100), (c, 1), generator=gen).to(dev)
            out = be.step(ids, torch.ones(c, dtype=torch.long, device=dev), torch.zeros(c, dtype=torch.long, device=dev),
                          torch.ones(c, dtype=torch.bool, device=dev), 1)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out.float().reshape(c, -1).clone()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="triton,mixer")
    ap.add_argument("--out", default=None)
    ap.add_argument("--model", default="qwen3.5-2b")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    from flarectl.models.loading import load_model

    model = load_model(a.model, random_init=True, dtype="float32", device=a.device)
    ref = one_step(model, gdn_kernel="torch", compile=False, cuda_graphs=False, gemv=False, fuse=False)
    print(f"fp32 reference done, logits norm {ref.norm():.3e}", flush=True)
    model.to(torch.bfloat16)
    res, logits = {}, {}
    for name in a.variants.split(","):
        got = one_step(model, **VARIANTS[name])
        logits[name] = got
        res[name] = dict(rel_err_vs_fp32=float((got - ref).norm() / ref.norm()),
                         argmax_agree_vs_fp32=float((got.argmax(-1) == ref.argmax(-1)).float().mean()))
        print(f"{name}: {res[name]}", flush=True)
    names = list(logits)
    for i in range(1, len(names)):
        d = float((logits[names[i]] - logits[names[0]]).norm() / logits[names[0]].norm())
        res[f"{names[i]}_vs_{names[0]}"] = d
    print("\n| bf16 path | logits rel err vs fp32 | argmax agree vs fp32 |\n| --- | --- | --- |")
    for n in names:
        print(f"| {n} | {res[n]['rel_err_vs_fp32']:.3e} | {res[n]['argmax_agree_vs_fp32']:.3f} |")
    for k, v in res.items():
        if "_vs_" in k:
            print(f"{k}: rel diff {v:.3e}")
    if a.out:
        open(a.out, "w").write(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
