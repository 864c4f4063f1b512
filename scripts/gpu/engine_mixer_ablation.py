"""Where the GDN mixer's time goes, by ablation, on one GPU (issue 6): variants of ``flarectl/engine/mixer.py`` with
one part of the kernel taken out, each timed as ``engine_mixer_sweep.py`` times the mixer (18 launches on distinct
states in one CUDA graph, median of 20 replays, us per launch) at the AR and trust step shapes, beside the state-copy
floor. The variants compute wrong results on purpose (timing only); the engine never runs them.

    python3 scripts/gpu/engine_mixer_ablation.py --out $OUT

* ``full``      the kernel as the engine runs it;
* ``no_tail``   every program arrives at its group's counter, none finishes the group (no gated norm of whole
                heads, no q/k conv commit): what the last program's tail costs;
* ``no_sync``   no counter at all: every program commits the q/k conv context itself, nobody norms whole heads:
                what the arrival (an atomic round trip) and the tail cost together;
* ``baseline`` (``--baseline FILE``): another mixer.py, e.g. ``git show <commit>:flarectl/engine/mixer.py``, timed
  beside the others (full, nothing taken out).

* ``no_conv_commit``  ``no_sync`` without any conv commit (v channels included).

Each variant is mixer.py with its source edited (asserted to match once) and imported from a temporary file, so
Triton reads its source as it reads the engine's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_mixer_sweep import state_copy_us, time_us  # noqa: E402

from flarectl.engine import mixer  # noqa: E402

EDITS = {  # for flarectl/engine/mixer.py as of session 19 (docs/perf/engine_session20/mixer_early_tail.patch changes them)
    "full": [],
    "no_tail": [("if arrived == G - 1:", "if arrived == -1:")],
    "no_sync": [("        if G == 1:\n", "        if True:\n")],
    "no_conv_commit": [("        if G == 1:\n", "        if True:\n"),
                       ("        _commit_conv(proj_row, conv_row, lconv_row, ch_v, mask_v, cnt, flag, s_pt, S, BS)\n", ""),
                       ("            _commit_conv(proj_row, conv_row, lconv_row, ch_q, mask_k, cnt, flag, s_pt, S, BS)\n"
                        "            _commit_conv(proj_row, conv_row, lconv_row, ch_k, mask_k, cnt, flag, s_pt, S, BS)\n"
                        "        else:", "            pass\n        else:")],
}


def variant(name: str, edits: list[tuple[str, str]], tmp: Path, source: Path | None = None):
    src = (source or Path(mixer.__file__)).read_text()
    for old, new in edits:
        assert src.count(old) == 1, (name, old)
        src = src.replace(old, new)
    path = tmp / f"mixer_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"mixer_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/out")
    ap.add_argument("--variants", default=",".join(EDITS), help="comma list of " + ", ".join(EDITS))
    ap.add_argument("--baseline", type=Path, default=None, help="a mixer.py to time beside them")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = {"ar": (1, 1, False, 1), "trust": (8, 4, True, 2)}  # W, clean tokens, anchored, token block
    rows = [dict(variant="state_copy", us=state_copy_us())]
    print(f"state copy floor: {rows[0]['us']:.2f} us", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        todo = [(name, EDITS[name], None) for name in args.variants.split(",") if name]
        if args.baseline is not None:
            todo.insert(0, ("baseline", [], args.baseline))
        for name, edits, source in todo:
            module = variant(name, edits, Path(tmp), source)
            for step, (W, wc, anchored, tb) in shapes.items():
                try:
                    us = time_us(W, wc, anchored, tb, 32, 4, module=module)
                except Exception as exc:  # noqa: BLE001 - a variant that does not build: recorded
                    rows.append(dict(variant=name, step=step, error=repr(exc)[:300]))
                    print(name, step, "FAILED", repr(exc)[:300], flush=True)
                    continue
                rows.append(dict(variant=name, step=step, us=us))
                print(f"{name:15} {step:6} {us:7.2f} us/launch", flush=True)
    torch.cuda.synchronize()
    (out / "mixer_ablation.json").write_text(json.dumps(rows, indent=1))
    print("\nablation (us per launch, 32 state columns, 4 warps):")
    for r in rows:
        print(f"  {r['variant']:15} {r.get('step', ''):6} {r['us']:.2f}" if "us" in r else f"  {r['variant']} {r['step']} failed")


if __name__ == "__main__":
    main()
