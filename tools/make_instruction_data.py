"""Writes a small instruction data set (alpaca JSONL) for the offline SmolLM2 example and its test.

The task is a fixed reply style the base model does not know ("Fruit report: ..."), so a few dozen LoRA
steps visibly lower the validation loss.

    python tools/make_instruction_data.py data/fruit
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

FRUITS = {"apple": "red", "banana": "yellow", "lime": "green", "plum": "purple", "orange": "orange",
          "blueberry": "blue", "cherry": "red", "kiwi": "brown", "lemon": "yellow", "grape": "purple",
          "pear": "green", "peach": "orange", "fig": "purple", "coconut": "brown", "mango": "orange"}
TEMPLATES = ["Describe the {f}.", "Tell me about the {f}.", "What do you know about the {f}?", "Give a fruit report on the {f}."]


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fruit = rng.choice(sorted(FRUITS))
        out.append({"instruction": rng.choice(TEMPLATES).format(f=fruit),
                    "output": f"Fruit report: {fruit.upper()} | color: {FRUITS[fruit]} | status: fresh. End of report."})
    return out


def write(out_dir: Path, train: int = 48, val: int = 16, seed: int = 0) -> dict[str, Path]:
    """Writes `train.jsonl` and `val.jsonl` in `out_dir` and returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, n, s in (("train", train, seed), ("val", val, seed + 1)):
        paths[name] = out_dir / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows(n, s)))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--val", type=int, default=16)
    args = parser.parse_args()
    print(write(args.out_dir, args.train, args.val))
