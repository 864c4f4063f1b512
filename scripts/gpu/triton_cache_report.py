"""Summarise the Triton cache of a run: per compiled kernel, its shared memory, stages, warps and whether its loops
were software-pipelined (cp.async / TMA copies in the PTX). Issue 6, session 13: offline compiles on the CPU box
showed no cp.async in the skinny GEMM; this says what the device's Triton builds.

    TRITON_CACHE_DIR=/tmp/tcache python3 ... ; python3 scripts/gpu/triton_cache_report.py /tmp/tcache [name-filter]
"""

import json
import sys
from collections import Counter
from pathlib import Path

root = Path(sys.argv[1])
want = sys.argv[2] if len(sys.argv) > 2 else ""
rows = Counter()
for meta in root.rglob("*.json"):
    if meta.name.startswith("__grp__"):
        continue
    try:
        m = json.loads(meta.read_text())
    except Exception:  # noqa: BLE001
        continue
    name = m.get("name", "")
    if want not in name:
        continue
    ptx = next(iter(meta.parent.glob("*.ptx")), None)
    text = ptx.read_text() if ptx else ""
    key = (name, m.get("shared"), m.get("num_stages"), m.get("num_warps"), text.count("cp.async.cg") +
           text.count("cp.async.ca"), text.count("cp.async.bulk"), text.count("griddepcontrol.wait"),
           text.count("prefetch.global"))
    rows[key] += 1
print("| kernel | shared B | stages | warps | cp.async | bulk copies | gdc_wait | L2 prefetch | builds |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for k, n in sorted(rows.items(), key=lambda kv: str(kv[0])):
    print("| " + " | ".join(str(v) for v in k) + f" | {n} |")
