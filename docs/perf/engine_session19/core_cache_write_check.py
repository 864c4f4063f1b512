"""Session 19: the attention-core GPU test's cache-write check at that test's shape, old form (written slots taken
from the values that changed) vs new form (slots from the lengths, ``_clean_slot_mask``), on the CPU interpreter.

    FLARE_ENGINE_KERNELS_CHILD=1 TRITON_INTERPRET=1 python docs/perf/engine_session19/core_cache_write_check.py
"""

import sys

import torch

sys.path.insert(0, "tests")  # run from the repository root
from test_engine_kernels import _clean_slot_mask, _core_problem  # noqa: E402

from flarectl.engine import attention, attention_core  # noqa: E402

attention.NAN_FILL = attention_core.NAN_FILL = True
for dtype in (torch.bfloat16, torch.float32):
    for wc, ww in ((1, 0), (5, 0), (5, 4)):
        args = _core_problem(3, C=8, wc=wc, ww=ww, hq=8, hkv=2, d=256, rot=64, S=524, dtype=dtype)
        ref = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        key0 = args[6].clone()
        attention_core.attention_core(*args)
        attention_core.attention_core_reference(*ref)
        changed = args[6] != key0
        old_ok = torch.equal(args[6][~changed], ref[6][~changed])
        slots = _clean_slot_mask(key0, args[8], wc)
        new_ok = torch.equal(args[6][~slots], key0[~slots]) and torch.equal(ref[6][~slots], key0[~slots])
        same = (args[6] == key0) & slots  # written, but to the value it replaced
        print(f"{str(dtype):15} W {wc}+{ww}: old check {old_ok}, new check {new_ok}; kernel values equal to the "
              f"replaced ones {int(same.sum())}, the twin's differs at {int((same & (ref[6] != key0)).sum())}",
              flush=True)
