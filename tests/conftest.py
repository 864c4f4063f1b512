"""Shared fixtures. GPU tests (marked ``gpu``) are skipped when CUDA is unavailable."""

import os

# Tiny models: one intra-op thread is faster than two and immune to oversubscription on a busy 2-core machine
# (measured: AR-Trust on debug-hybrid took 25 s with 2 threads next to another job, 0.8 s with 1). Subprocesses
# (CLI tests) inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def debug_models():
    """name -> fp64 FlareModel for the two tiny presets (hybrid and Llama)."""
    from flarectl.models.loading import load_model

    models = {}
    for name in ("debug-hybrid", "debug-llama"):
        m = load_model(name, dtype="float32", device="cpu", seed=1)
        m.hf.double()
        models[name] = m
    return models


@pytest.fixture(scope="module")
def sharp():
    """fp64 debug models with a sharpened LM head (drafts get accepted, thresholds pass: every branch runs)."""
    from flarectl.models.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for name in ("debug-hybrid", "debug-llama"):
        m = load_model(name, dtype="float32", device="cpu", seed=1)
        m.hf.double()
        with torch.no_grad():
            m.hf.lm_head.weight.mul_(30)
        out[name] = m
    yield out
    torch.set_num_threads(threads)


@pytest.fixture
def run_interpreted():
    """``run(test_file, flag, timeout=600)``: run ``test_file`` in a child pytest with Triton's interpreter on (it
    must be on before triton is imported) and env ``flag=1`` selecting its interpreted tests; skip without triton,
    fail with the child's output tail if it fails; returns the child's stdout."""
    import subprocess
    import sys

    def run(test_file: str, flag: str, timeout: int = 600) -> str:
        try:
            import triton  # noqa: F401
        except ImportError:
            pytest.skip("triton not installed")
        env = {**os.environ, flag: "1", "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                           env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
        return r.stdout

    return run


@pytest.fixture
def one_line_error(capsys):
    """``check(argv, message)``: ``flarectl *argv`` run in this process exits 2 with exactly one stderr line that
    holds ``message``, and no traceback."""
    def check(argv: list[str], message: str) -> None:
        import sys

        from flarectl.cli import main

        saved = sys.argv
        sys.argv = ["flarectl", *argv]
        try:
            with pytest.raises(SystemExit) as exc:
                main()
        finally:
            sys.argv = saved
        err = capsys.readouterr().err
        assert exc.value.code == 2, err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    return check
