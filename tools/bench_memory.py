#!/usr/bin/env python
"""Peak memory and throughput of an SFT step at a large vocabulary: mmtune against TRL's SFTTrainer.

A Llama-shaped model with a 151,936-token vocabulary (Qwen2's) is built from a config here (no hub),
hidden 256, so the output projection and its logits dominate memory as they do in a real 0.5-8B
model fine-tuned at long context. Both sides train the same LoRA (r 16, all linear layers) on the same
conversations (loss on assistant tokens), batch size and maximum length, for the same steps, with the
same torch thread count (`tools/bench_sft.py`'s runners). Each run is its own subprocess, so each
peak is its own: `peak RSS` is the highest resident memory during the training call (VmHWM reset at
its start), `growth` that minus the RSS at its start (the loaded model and libraries excluded).

    python tools/bench_memory.py --packing --batch_size 4 --steps 3   # 151,936 vocab, 1 thread
    python tools/bench_memory.py --vocab_size 32000 --batch_size 16 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench_sft():
    sys.path.insert(0, str(HERE))
    import bench_sft

    return bench_sft


def worker(args) -> None:
    """One side in this process; prints its result as the last line (JSON)."""
    import torch

    torch.set_num_threads(args.threads)
    bench = _bench_sft()
    train_rows = [json.loads(line) for line in Path(args.train).read_text().splitlines()]
    val_rows = bench.make_rows(8, 1)
    args.seed, args.lr, args.schedule = 0, 2e-3, "constant"
    if args.side == "mmtune":
        result = bench.run_mmtune(args.model, Path(args.train), val_rows, args, args.packing)
    else:
        result = bench.run_trl(args.model, train_rows, val_rows, args, args.packing)
    print(json.dumps({k: v for k, v in result.items() if k != "train_losses"}))


def run_side(side: str, model: str, train: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model", model, "--train", str(train),
           "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--max_length", str(args.max_length),
           "--threads", str(args.threads)] + (["--packing"] if args.packing else [])
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab_size", type=int, default=151936)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each side (see tools/fair_threads.py)")
    parser.add_argument("--packing", action="store_true", help="pack rows on both sides")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--worker", choices=["mmtune", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--train", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.side = args.worker
        return worker(args)
    sys.path.insert(0, str(HERE))
    from fair_threads import oversubscription_warning

    warning = oversubscription_warning(args.threads)
    if warning:
        print(warning, flush=True)
    bench = _bench_sft()
    root = Path(tempfile.mkdtemp())
    model = str(bench.tiny_model(root, vocab_size=args.vocab_size, layers=2, name="vocab_llama"))
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in bench.make_rows(max(64, args.steps * args.batch_size), 0)))
    results = {side: run_side(side, model, train, args) for side in ("mmtune", "trl")}
    mm, trl = results["mmtune"], results["trl"]
    print(f"vocabulary {args.vocab_size}, batch {args.batch_size}, max length {args.max_length}, {args.steps} steps, "
          f"{args.threads} threads, packing {'on' if args.packing else 'off'}")
    print(f"{'side':8} {'tokens':>7} {'tokens/s':>9} {'peak RSS MB':>12} {'growth MB':>10}")
    for side, r in results.items():
        print(f"{side:8} {r['tokens']:7d} {r['tokens_per_s']:9.0f} {r['peak_rss_mb']:12.0f} "
              f"{r['peak_rss_mb'] - r['rss_start_mb']:10.0f}")
    print(f"mmtune / TRL: peak RSS {mm['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x, growth "
          f"{(mm['peak_rss_mb'] - mm['rss_start_mb']) / max(trl['peak_rss_mb'] - trl['rss_start_mb'], 1):.2f}x, "
          f"tokens/s {mm['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
