"""AR-Trust vs AR exact match on one checkpoint in bf16 and fp32 (is a mismatch numerics or a bug?).

    python scripts/gpu/artrust_dtype_check.py --model /tmp/conv_distilled/final --out $OUT/artrust_dtype.json
"""
import argparse, json, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode_quality import prompts, prefix_share  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--out", type=Path, required=True)
p.add_argument("--batch-sizes", default="8,1")
a = p.parse_args()
from flarectl.decoding import generate
from flarectl.models.loading import load_model

out = []
for dtype in ("float32", "bfloat16"):
    model = load_model(a.model, dtype=dtype)
    ids = [i for _, i in prompts(model.tokenizer, 16, 16)]
    for bs in [int(x) for x in a.batch_sizes.split(",")]:
        toks = {}
        for mode in ("ar", "ar-trust"):
            t0, res = time.perf_counter(), []
            for b in range(0, len(ids), bs):
                res += generate(model, ids[b:b + bs], mode, max_new_tokens=128)
            toks[mode] = ([r.token_ids for r in res], sum(r.forwards for r in res), time.perf_counter() - t0)
        ref, got = toks["ar"][0], toks["ar-trust"][0]
        row = {"dtype": dtype, "batch": bs, "exact": sum(x == y for x, y in zip(ref, got)) / len(ref),
               "prefix": sum(prefix_share(x, y) for x, y in zip(ref, got)) / len(ref),
               "tok_per_fwd": sum(map(len, got)) / max(toks["ar-trust"][1], 1),
               "first_diff": [next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(ref, got)]}
        print(json.dumps({k: v for k, v in row.items() if k != "first_diff"}), flush=True)
        out.append(row)
    del model
a.out.write_text(json.dumps(out, indent=1))
