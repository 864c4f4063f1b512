"""The package layout: every source package is installed, and the repository's ``kernels/`` folder never shadows
Hugging Face's ``kernels`` package (transformers >= 5.2x imports it at model import time)."""

import importlib.util
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(cfg["packages"]), cfg["package-dir"]


def test_every_package_with_an_init_is_declared():
    packages, dirs = _declared()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            dotted = ".".join([name, *rel.parts]) if rel.parts else name
            assert dotted in packages, f"{init.parent} ({dotted}) is not in pyproject's packages: a wheel drops it"


def test_kernels_folder_is_no_regular_package():
    # A kernels/__init__.py would make `import kernels` (transformers' hub kernels) load this folder whenever the
    # repository root is on sys.path (python -m pytest, python -m flarectl.cli), and every model import fail.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.find_spec("kernels")
    finally:
        sys.path.remove(str(ROOT))
    if spec is not None and spec.origin is not None:  # a regular package elsewhere (HF kernels) wins
        assert not Path(spec.origin).is_relative_to(ROOT / "kernels")
