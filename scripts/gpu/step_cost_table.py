"""Medians per variant of ``flarectl bench --step-cost`` JSON files named ``<label><round>_step_cost_*.json``.

    python3 scripts/gpu/step_cost_table.py /tmp/s22/*_step_cost_mixer.json

Prints one row per variant (in first-seen order): the ms of each run per step kind, their median, and the median's
ratio to the roofline (AR) and change against the first variant."""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(paths: list[str]) -> None:
    runs: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    roof = []
    for p in paths:
        label = re.sub(r"\d+$", "", Path(p).name.split("_step_cost")[0])
        data = json.loads(Path(p).read_text())
        roof.append(data["roofline_ms"])
        for s in data["steps"]:
            runs[label][s["kind"]].append(s["ms"])
    if not runs:
        print("no step-cost JSON")
        return
    r = statistics.median(roof)
    kinds = ["ar", "trust", "window"]
    first = next(iter(runs))
    print(f"step cost, ms (median of runs; roofline {r:.3f} ms; change vs '{first}')")
    for label, by in runs.items():
        cells = []
        for k in kinds:
            v = by.get(k, [])
            if not v:
                cells.append(f"{k} -")
                continue
            m = statistics.median(v)
            base = statistics.median(runs[first][k]) if runs[first].get(k) else m
            extra = f" = {m / r:.3f}x" if k == "ar" else ""
            cells.append(f"{k} {m:.3f}{extra} ({1000 * (m - base):+.0f} us) [{', '.join(f'{x:.3f}' for x in v)}]")
        print(f"{label:10s} " + " | ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1:])
