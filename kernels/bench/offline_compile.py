"""Compile the chunk-window Triton kernels for an NVIDIA target on a machine without a GPU and report shared memory,
registers and spills (Triton's own compiler + the ptxas it runs, shipped in the triton wheel). Launch configurations that
would fail with ``OutOfResources`` on the device, or spill heavily, show up here first.

    python -m flare_kernels.bench.offline_compile --kernel bwd --BV 32 --num-warps 8 --maxw 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flare_kernels.two_stream import triton_chunk_windows as tcw
from flare_kernels.two_stream import triton_chunk_windows_bwd as tcwb

KERNELS = {"fwd": tcw._chunk_windows_fwd_kernel, "bwd": tcw._chunk_windows_bwd_kernel,
           "bwd-values": tcwb._bwd_values_kernel, "bwd-keys": tcwb._bwd_keys_kernel}
BF16_ARGS = {"qn", "kn", "vn", "don", "k", "vnew", "on", "dvn", "dv_clean", "mat_ss", "mat_st", "aq_out", "ak_out",
             "aq_in", "ak_in"}
# the keys kernel's outputs at H == HV in bf16: dq/dk of the noisy stream cast in the kernel, the injection stored
# in the states' dtype (the one-kernel backward "bwd" keeps fp32 partials and an fp32 injection)
BF16_ARGS_KEYS = {"dqn", "dkn", "x_inj"}


def ptxas_report(ptx: str, arch: int = 90) -> dict:
    """{registers, spill_stores, spill_loads} of PTX assembled for ``sm_<arch>a`` by the ptxas Triton itself runs
    for that arch (``get_ptxas``: Triton 3.9 runs ``ptxas-blackwell`` everywhere, its ``bin/ptxas`` cannot read
    the PTX 3.9 emits); None values where ptxas could not run."""
    from triton.backends.nvidia.compiler import get_ptxas

    info = dict(registers=None, spill_stores=None, spill_loads=None)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        r = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                           capture_output=True, text=True)
    except OSError:
        return info
    finally:
        os.unlink(f.name)
    for line in r.stderr.splitlines():
        if "Used" in line and "registers" in line:
            info["registers"] = int(line.split("Used")[1].split("registers")[0])
        if "spill stores" in line:
            parts = line.split(",")
            info["spill_stores"] = int(parts[-2].split()[0])
            info["spill_loads"] = int(parts[-1].split()[0])
    return info


def compile_report(kernel="bwd", BV=32, num_warps=8, maxw=4, K=128, slots=64, arch=90) -> dict:
    """{shared_bytes, registers, spill_stores, spill_loads} of one kernel at H=HV=16, K=V=``K``, bf16 inputs."""
    fn = KERNELS[kernel]
    consts = dict(H=16, HV=16, K=K, V=K, BT=64, BC=slots, BK=BV if kernel == "bwd-keys" else K, BV=BV, MAXW=maxw,
                  NV=2, BVF=K, PREC="tf32")
    consts = {n: v for n, v in consts.items() if n in fn.arg_names}
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n == "scale":
            sig[n] = "fp32"
        elif n in ("T", "Tn", "NC", "NT", "c0", "NL"):  # (bwd-keys: --BV is its K block)
            sig[n] = "i32"
        elif n in BF16_ARGS or (kernel == "bwd-keys" and n in BF16_ARGS_KEYS):
            sig[n] = "*bf16"
        elif n.startswith(("slot_", "chunk_")):
            sig[n] = "*i32"
        else:
            sig[n] = "*fp32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    c = triton.compile(src, target=GPUTarget("cuda", arch, 128), options=dict(num_warps=num_warps, num_stages=1))
    return dict(shared_bytes=c.metadata.shared, **ptxas_report(c.asm["ptx"], arch))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="bwd")
    ap.add_argument("--BV", type=int, nargs="+", default=[32])
    ap.add_argument("--num-warps", type=int, nargs="+", default=[8])
    ap.add_argument("--maxw", type=int, default=4)
    a = ap.parse_args()
    for bv in a.BV:
        for nw in a.num_warps:
            r = compile_report(a.kernel, bv, nw, a.maxw)
            print(f"{a.kernel} BV={bv} warps={nw} maxw={a.maxw}: shared {r['shared_bytes'] / 1024:.0f} KiB, "
                  f"{r['registers']} registers, spills {r['spill_stores']} B stored / {r['spill_loads']} B loaded",
                  flush=True)


if __name__ == "__main__":
    main()
