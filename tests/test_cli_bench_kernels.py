"""`flarectl bench kernels` / `flarectl bench train` on a CPU machine: --help works, no GPU is one error line."""

import os
import subprocess
import sys

import pytest
import torch

CLI = [sys.executable, "-m", "flarectl.cli"]


def _run(*args, timeout=120):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})


def _lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip() and "Warning" not in l and "_cpu_device_warning" not in l]


@pytest.mark.parametrize("cmd", ["kernels", "train"])
def test_help(cmd):
    res = _run("bench", cmd, "--help")
    assert res.returncode == 0, res.stderr
    assert "--out" in res.stdout and ("--T" in res.stdout if cmd == "kernels" else "--variant" in res.stdout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
@pytest.mark.parametrize("cmd", ["kernels", "train"])
def test_no_cuda_is_one_line_exit_2(cmd, tmp_path):
    res = _run("bench", cmd, "--out", str(tmp_path))
    lines = _lines(res.stderr)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert len(lines) == 1 and "CUDA GPU" in lines[0], lines
    assert not (tmp_path / "kernels.json").exists()


def test_bad_option_is_one_line_exit_2(tmp_path):
    res = _run("bench", "kernels", "--variant", "nope", "--out", str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "--variant" in res.stderr
