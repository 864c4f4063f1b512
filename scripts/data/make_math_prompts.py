"""Synthetic grade-school math word problems (prompts only) for a self-distilled transfer set.

    python scripts/data/make_math_prompts.py --out /tmp/math_prompts.jsonl [--count 320] [--seed 0]

The default transfer set has no math at all (code, sonnets, Shakespeare: flarectl/data/default_transfer_set.md), so a
converted model drafts math answers poorly: on gsm8k-style prompts the session-9 CPU conversion of SmolLM2 reached
1.19 AR-Trust tokens/forward against 1.41 on HumanEval (docs/perf/engine.md, session 10). These prompts are filled
from templates written for flarectl, in the "Question: ...\\nAnswer: Let's think step by step." format, with numbers
drawn from a seeded generator. Their names and objects are disjoint from the 40 benchmark prompts
(flarectl/engine/prompts/gsm8k_style.jsonl), and the script refuses to write a question that shares a 6-word run
with one of them. The answers come from the model itself (``python -m flarectl.data.self_distill --source FILE``),
so no solution is written here. Records: {"task": "math_word", "prompt", "source", "license"}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Omar", "Priya", "Hugo", "Zoe", "Ivan", "Lena", "Ravi", "Chloe", "Diego", "Fatima", "Yuki", "Noah",
         "Greta", "Kofi", "Elena", "Marco", "Aisha", "Felix", "Ines", "Tariq"]
ITEMS = ["marbles", "stickers", "cookies", "stamps", "seashells", "postcards", "crayons", "buttons", "beads",
         "trading cards"]
TEMPLATES = [
    "{a} collects {i}. {a} starts with {x} {i}, finds {y} more on Monday and loses {z} on Tuesday. How many {i} "
    "does {a} have left?",
    "A bakery packs muffins in trays of {x}. This morning it filled {y} trays and sold {z} muffins. How many "
    "muffins are still in the trays?",
    "{a} saves {x} dollars every week. After {y} weeks, {a} spends {z} dollars on a jacket. How much money is left?",
    "A garden has {x} rows of tulips with {y} tulips in each row. A storm breaks {z} of them. How many tulips are "
    "still standing?",
    "{a} and {b} share {x} {i} equally, and then {a} gives {y} of them to a friend. How many {i} does {a} have now?",
    "A train ticket costs {x} dollars for an adult and {y} dollars for a child. How much do {z} adults and 2 "
    "children pay together?",
    "{a} runs {x} kilometers on each of {y} days and walks {z} kilometers on the last day. How many kilometers "
    "does {a} cover in total?",
    "A library had {x} books. It received {y} boxes of {z} books each. How many books does the library have now?",
    "{a} buys {z} notebooks at {y} dollars each and pays with {bill} dollars. How much change does {a} get?",
    "A farmer has {x} chickens. Each chicken lays {y} eggs a week. The farmer sells the eggs in cartons of {z}. "
    "How many full cartons does the farmer fill in one week?",
    "{a} reads {x} pages on Friday, twice as many on the next day, and {y} pages on the day after. How many pages "
    "did {a} read over the three days?",
    "A school orders {x} packs of {i} with {y} in each pack. The {i} are shared among {z} classes equally. How "
    "many {i} does each class get?",
    "{a} has {x} {i}. {b} has {y} more than {a}, and {c} has half as many as {b}. How many {i} do they have "
    "together?",
    "A cinema has {x} seats. {y} tickets are sold for the first show and {z} for the second. How many empty "
    "seats are there over both shows?",
    "{a} plants {x} seeds in each of {y} pots. Only {z} seeds do not sprout. How many seeds sprout?",
    "A shop sells pens in boxes of {x}. {a} needs {y} pens for a class of students. How many boxes must {a} buy, "
    "and how many pens are left over?",
]


CHECKS = {  # template index -> condition on (x, y, z) for a problem that makes sense (else drawn again)
    1: lambda x, y, z: z <= x * y, 2: lambda x, y, z: z <= x * y, 4: lambda x, y, z: x % 2 == 0 and y <= x // 2,
    11: lambda x, y, z: (x * y) % z == 0, 12: lambda x, y, z: (x + y) % 2 == 0, 13: lambda x, y, z: y + z <= 2 * x,
}


def words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() else " " for c in text).split()


def shingles(text: str, n: int = 6) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def make(count: int, seed: int, avoid: list[str]) -> list[dict]:
    rng = random.Random(seed)
    banned = set().union(*(shingles(q.split("\nAnswer:")[0]) for q in avoid)) if avoid else set()
    out, seen = [], set()
    while len(out) < count:
        a, b, c = rng.sample(NAMES, 3)
        k = rng.randrange(len(TEMPLATES))
        x, y, z = rng.randint(12, 96), rng.randint(2, 12), rng.randint(2, 11)
        if not CHECKS.get(k, lambda *_: True)(x, y, z):
            continue
        bill = -(-(y * z + 1) // 20) * 20  # the next multiple of 20 above the price
        q = TEMPLATES[k].format(a=a, b=b, c=c, i=rng.choice(ITEMS), x=x, y=y, z=z, bill=bill)
        if q in seen or shingles(q) & banned:
            continue
        seen.add(q)
        out.append({"task": "math_word", "prompt": f"Question: {q}\nAnswer: Let's think step by step.",
                    "source": f"synthetic template (flarectl scripts/data/make_math_prompts.py, seed {seed})",
                    "license": "Apache-2.0 (written for flarectl)"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    bench = Path(__file__).resolve().parents[2] / "flarectl" / "engine" / "prompts" / "gsm8k_style.jsonl"
    avoid = [json.loads(line)["prompt"] for line in bench.read_text().splitlines() if line.strip()]
    recs = make(args.count, args.seed, avoid)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"wrote {len(recs)} prompts to {args.out}")


if __name__ == "__main__":
    main()
