"""Preference-loss training speed: mmtune against TRL's trainers in one run (TRL is a dev-only dependency).

For each loss, the same tiny model (or `--model`), the same rows, LoRA settings (r 16 on every linear
layer, reference = adapters off), batch size, learning rate, number of steps and torch thread count on
both sides: DPO against `trl.DPOTrainer`, KTO against `trl.KTOTrainer` (unpaired rows, KL term on),
ORPO against `trl.experimental.orpo.ORPOTrainer` and SimPO against `trl.experimental.cpo.CPOTrainer`
(`loss_type="simpo"`, `cpo_alpha=0`). Reports optimizer steps per second and examples per second
(pairs; KTO: rows) of the training loop alone (from its start to its end: reading and tokenizing the data
are outside on both sides), and the last logged training loss of each side as a sanity check.

    python tools/bench_preference.py --steps 40 --threads 2        # tiny Llama built here, offline
    python tools/bench_preference.py --quick                       # a smoke run (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import WORDS, tiny_model  # noqa: E402  (tools/ is a folder of scripts)
from fair_threads import HELP as THREADS_HELP, apply_threads  # noqa: E402

LOSSES = ("dpo", "kto", "orpo", "simpo")


def pair_rows(n: int, seed: int) -> list[dict]:
    """Prompt, a chosen reply (the word repeated k times) and a rejected one (another word), mixed lengths."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w, other = rng.sample(WORDS, 2)
        k = rng.choice([1, 2, 3, 5, 8, 13, 21])
        rows.append({"prompt": f"Say {w} {k} times.", "chosen": " ".join([w] * k), "rejected": " ".join([other] * k)})
    return rows


def unpaired_rows(pairs: list[dict]) -> list[dict]:
    """KTO's rows: alternately the chosen reply (desirable) and the rejected one, one per pair."""
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 == 0 else r["rejected"], "label": i % 2 == 0}
            for i, r in enumerate(pairs)]


def run_mmtune(model_dir: str, loss: str, rows: list[dict], args) -> dict:
    import lightning as L

    from mmtune import AdapterSpec, DPOTask, ModelSpec, MonitorSpec, OptimizerSpec, PreferenceData, PreferenceSpec

    path = Path(tempfile.mkdtemp()) / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = DPOTask(ModelSpec(name=model_dir), AdapterSpec(method="lora", r=16, alpha=32),
                   OptimizerSpec(lr=args.lr, warmup=0, weight_decay=0.0, schedule="constant"),
                   MonitorSpec(early_stopping=False, save_best=False, save_last=False),
                   preference=PreferenceSpec(loss=loss, beta=args.beta))
    dm = PreferenceData(path=str(path), split=(1.0, 0.0, 0.0), max_length=args.max_length, batch_size=args.batch_size,
                        shuffle=False)

    class Clock(L.Callback):
        start = seconds = 0.0
        last_loss = float("nan")

        def on_train_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.last_loss = float(outputs["loss"])

        def on_train_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[clock], default_root_dir=tempfile.mkdtemp())
    trainer.fit(task, datamodule=dm)
    return {"seconds": clock.seconds, "steps_per_s": args.steps / clock.seconds,
            "examples_per_s": args.steps * args.batch_size / clock.seconds, "last_loss": clock.last_loss}


def _trl_trainer(loss: str, model, tokenizer, rows: list[dict], args, out: str, callbacks: list):
    import datasets
    from peft import LoraConfig

    common = dict(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                  learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                  max_length=args.max_length, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                  dataloader_num_workers=0, disable_tqdm=True, beta=args.beta,
                  train_sampling_strategy="sequential")  # the file's order, as mmtune's shuffle: false
    data = datasets.Dataset.from_list(rows)
    peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    kwargs = dict(model=model, train_dataset=data, processing_class=tokenizer, peft_config=peft_config,
                  callbacks=callbacks)
    if loss == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(args=DPOConfig(**common), **kwargs)
    if loss == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer(args=KTOConfig(**common), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the experimental trainers warn on import
        if loss == "orpo":
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            return ORPOTrainer(args=ORPOConfig(**common), **kwargs)
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOTrainer(args=CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5), **kwargs)


def run_trl(model_dir: str, loss: str, rows: list[dict], args) -> dict:
    from transformers import AutoModelForCausalLM, TrainerCallback

    from mmtune.models.hf import load_tokenizer
    from mmtune.specs import ModelSpec

    tokenizer = load_tokenizer(ModelSpec(name=model_dir))  # the chat template mmtune uses
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    class Clock(TrainerCallback):
        start = seconds = 0.0
        last_loss = float("nan")

        def on_train_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

        def on_log(self, a, state, control, logs=None, **kw):
            self.last_loss = float((logs or {}).get("loss", self.last_loss))

    clock = Clock()
    trainer = _trl_trainer(loss, model, tokenizer, rows, args, tempfile.mkdtemp(), [clock])
    trainer.train()
    return {"seconds": clock.seconds, "steps_per_s": args.steps / clock.seconds,
            "examples_per_s": args.steps * args.batch_size / clock.seconds, "last_loss": clock.last_loss}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a local causal LM directory (default: a tiny Llama built here)")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help="a few steps of every loss (smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.max_length = 3, 4, 64
    apply_threads(args.threads)
    model_dir = args.model or str(tiny_model(Path(tempfile.mkdtemp())))
    pairs = pair_rows(max(64, args.steps * args.batch_size), 0)
    results = {}
    for loss in args.losses:
        rows = unpaired_rows(pairs) if loss == "kto" else pairs
        results[loss] = {"mmtune": run_mmtune(model_dir, loss, rows, args), "trl": run_trl(model_dir, loss, rows, args)}
    print(f"\n{args.steps} steps, batch {args.batch_size}, max_length {args.max_length}, "
          f"{torch.get_num_threads()} torch threads (both sides)")
    print(f"{'loss':6} {'mmtune steps/s':>15} {'TRL steps/s':>12} {'ratio':>7} {'mmtune ex/s':>12} {'TRL ex/s':>9}"
          f" {'last loss mmtune / TRL':>24}")
    for loss, r in results.items():
        mm, trl = r["mmtune"], r["trl"]
        print(f"{loss:6} {mm['steps_per_s']:15.2f} {trl['steps_per_s']:12.2f} {mm['steps_per_s'] / trl['steps_per_s']:6.2f}x"
              f" {mm['examples_per_s']:12.1f} {trl['examples_per_s']:9.1f} {mm['last_loss']:12.4f} / {trl['last_loss']:.4f}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                       indent=2))
    return results


if __name__ == "__main__":
    main()
