"""SFT throughput and quality: mmtune against TRL's SFTTrainer in one run (TRL is a dev-only dependency).

Same model, data (mixed lengths, chat form, loss on assistant tokens), LoRA settings, optimizer, batch
size and number of steps; each side with and without packing. Reports trained tokens per second
(non-padding tokens seen by the model / wall time of the training call) and the final validation loss,
computed for every run by the same code (mmtune's tokenization, per-token loss on assistant tokens).

So that the final losses can be compared run against run, both sides see the same training rows in
the same order (shuffled once here per seed of `--seeds`, then read in order: `shuffle: false` in mmtune,
`train_sampling_strategy="sequential"` in TRL), start from the same LoRA weights (the global seed is
set right before the adapters are injected; the script checks that the initial weights match) and
clip gradients at the same norm (1.0, TRL's default).

    python tools/bench_sft.py --steps 100 --seeds 0 1 2   # tiny Llama built here, offline
    python tools/bench_sft.py --model path/to/model_or.gguf --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("apple banana cherry grape lemon mango olive peach pear plum kiwi lime melon berry fig date red green "
         "blue black white cat dog bird fish horse").split()


def make_rows(n: int, seed: int) -> list[dict]:
    """Conversations whose replies range from 1 to 60 words (mixed lengths make padding costly)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        w = rng.choice(WORDS)
        k = rng.choice([1, 2, 3, 5, 8, 13, 21, 34, 60])
        rows.append({"messages": [{"role": "user", "content": f"Say {w} {k} times."},
                                  {"role": "assistant", "content": " ".join([w] * k)}]})
    return rows


def tiny_model(root: Path, vocab_size: int | None = None, layers: int = 4, name: str = "tiny_llama",
               shape: dict | None = None) -> Path:
    """A Llama (hidden 256) with a byte-level BPE tokenizer trained here and the ChatML template.
    `vocab_size` pads the model's vocabulary beyond the tokenizer's (a 150k head costs what it would
    with a real 150k tokenizer: the logits are as wide); `shape` overrides LlamaConfig fields (hidden
    size, heads...: `tools/gpu_check.py` builds a ~1B model this way)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from mmtune.models.hf import CHAT_TEMPLATES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["messages"][0]["content"] + " " + r["messages"][1]["content"] for r in make_rows(300, 9)]
    tok.train_from_iterator(corpus + ["user assistant system"] * 5, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATES.get("chatml")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=max(len(fast), vocab_size or 0), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, initializer_range=0.1)
    for key, value in (shape or {}).items():
        setattr(cfg, key, value)
    out = root / name
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def val_loss(model, tokenizer, val_rows: list[dict], max_length: int) -> float:
    """Per-token loss on assistant tokens, the same code for every run."""
    from mmtune.data.text import Collator, Conversation, tokenize_conversation
    from mmtune.losses.tokens import token_loss

    items = [tokenize_conversation(tokenizer, Conversation(r["messages"], f"val {i}"), True) for i, r in enumerate(val_rows)]
    items = [type(x)(x.input_ids[:max_length], x.labels[:max_length]) for x in items]
    collate = Collator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), 16):
            batch = collate([[x] for x in items[start:start + 16]])
            device = next(model.parameters()).device
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits.float().cpu()
            t, c = token_loss(logits, batch["labels"])
            total, count = total + float(t), count + int(c)
    return total / count


def reset_peak_rss() -> None:
    """Resets the process's peak RSS (VmHWM) to its current RSS (Linux: `clear_refs` value 5), so the
    peak read at the end of training is the training's own, not the model loading's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mb(field: str = "VmHWM") -> float:
    """`VmHWM` (peak RSS since the last reset) or `VmRSS` (now) of this process in MB (0 where unknown)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def token_counter():
    """A Lightning callback counting non-padding tokens of mmtune's training batches and timing the
    training loop (from its start to its end: data reading and tokenization are outside, as for TRL)."""
    import lightning as L

    class Counter(L.Callback):
        tokens, start, seconds, peak_rss, rss_start = 0, 0.0, 0.0, 0.0, 0.0

        def __init__(self):
            self.losses = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

        def on_train_start(self, trainer, module):
            reset_peak_rss()
            self.rss_start = rss_mb("VmRSS")
            self.start = time.perf_counter()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.tokens += int(batch["num_tokens"])

        def on_train_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.start
            self.peak_rss = rss_mb()

    return Counter()


def lora_fingerprint(model) -> float:
    """A checksum of the adapter weights (LoRA A is random at initialization, B is zero)."""
    return float(sum(p.double().abs().sum() * (i + 1) for i, (n, p) in
                     enumerate(sorted(model.named_parameters())) if "lora_" in n))


def run_mmtune(model_dir: str, train: Path, val_rows: list[dict], args, packing: bool) -> dict:
    import lightning as L

    from mmtune import AdapterSpec, CausalLMTask, ModelSpec, MonitorSpec, OptimizerSpec, TextData

    device, bf16 = getattr(args, "device", "cpu"), getattr(args, "precision", "32") == "bf16"
    quant = getattr(args, "quantization", "none")
    task = CausalLMTask(ModelSpec(name=model_dir, dtype="bfloat16" if bf16 else None, quantization=quant),
                        AdapterSpec(method="lora", r=16, alpha=32),
                        OptimizerSpec(lr=args.lr, warmup=0, weight_decay=0.0, schedule=args.schedule),
                        MonitorSpec(early_stopping=False, save_best=False, save_last=False))
    torch.manual_seed(args.seed)
    task.configure_model()  # builds and injects now, right after the seed (the Trainer then reuses it)
    init = lora_fingerprint(task.net)
    dm = TextData(path=str(train), split=(1.0, 0.0, 0.0), max_length=args.max_length, batch_size=args.batch_size,
                  packing=packing, shuffle=False)
    counter = token_counter()
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=args.steps,
                        precision="bf16-mixed" if bf16 else "32-true", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[counter], default_root_dir=tempfile.mkdtemp())
    trainer.fit(task, datamodule=dm)
    seconds = counter.seconds
    return {"tokens": counter.tokens, "seconds": seconds, "tokens_per_s": counter.tokens / seconds, "lora_init": init,
            "train_losses": counter.losses, "peak_rss_mb": counter.peak_rss, "rss_start_mb": counter.rss_start,
            "val_loss": val_loss(task.net, task.tokenizer, val_rows, args.max_length)}


def run_trl(model_dir: str, train_rows: list[dict], val_rows: list[dict], args, packing: bool) -> dict:
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from mmtune.models.hf import load_tokenizer
    from mmtune.specs import ModelSpec

    tokenizer = load_tokenizer(ModelSpec(name=model_dir))  # the same template as mmtune uses
    device, bf16 = getattr(args, "device", "cpu"), getattr(args, "precision", "32") == "bf16"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    init = lora_fingerprint(model)
    out = tempfile.mkdtemp()
    cfg = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=args.lr, lr_scheduler_type=args.schedule, warmup_steps=0, weight_decay=0.0,
                    max_length=args.max_length, packing=packing, assistant_only_loss=True, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=device == "cpu", dataloader_num_workers=0,
                    seed=args.seed,
                    # SFTConfig's own defaults differ from mmtune's: bf16 autocast (even on CPU, where bf16
                    # matmuls are slow) and activation checkpointing on. Both off here, as on mmtune's side,
                    # unless --trl_defaults asks to measure TRL as it comes.
                    **({} if getattr(args, "trl_defaults", False) else {"bf16": bf16, "gradient_checkpointing": False}),
                    disable_tqdm=True, max_grad_norm=1.0, train_sampling_strategy="sequential")

    class Tokens(TrainerCallback):
        """TRL's own count of non-padding tokens, and the training loop's time."""

        def __init__(self):
            self.last, self.start, self.seconds, self.losses = 0, 0.0, 0.0, []
            self.peak_rss = self.rss_start = 0.0

        def on_train_begin(self, a, state, control, **kw):
            reset_peak_rss()
            self.rss_start = rss_mb("VmRSS")
            self.start = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.start
            self.peak_rss = rss_mb()

        def on_log(self, a, state, control, logs=None, **kw):
            self.last = (logs or {}).get("num_tokens", self.last)
            if "loss" in (logs or {}):
                self.losses.append(float(logs["loss"]))

    tokens = Tokens()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(train_rows),
                         processing_class=tokenizer, callbacks=[tokens])
    trainer.train()
    seconds = tokens.seconds
    return {"tokens": int(tokens.last), "seconds": seconds, "tokens_per_s": tokens.last / seconds, "lora_init": init,
            "train_losses": tokens.losses, "peak_rss_mb": tokens.peak_rss, "rss_start_mb": tokens.rss_start,
            "val_loss": val_loss(trainer.model, tokenizer, val_rows, args.max_length)}


def read_rows(path: Path) -> list[dict]:
    """Conversations of any file mmtune's TextData reads, as chat rows both sides take."""
    from mmtune.data.text_reading import TextSource, read_source

    samples = read_source(TextSource(str(path)))
    if any(getattr(s, "messages", None) is None for s in samples):
        raise SystemExit(f"{path}: plain-text rows; this comparison trains on conversations (loss on replies)")
    rows = [{"messages": list(s.messages)} for s in samples]
    if len(rows) < 64:
        raise SystemExit(f"{path}: {len(rows)} rows; need at least 64 (48 are held out for validation)")
    return rows


def single_thread_check(runs: dict, model_dir: str, train: Path, train_rows: list, val_rows: list, args) -> list[str]:
    """With more than one torch thread, reruns each side single-threaded (a third of the steps) and
    returns a warning for each side whose multi-threaded tokens/s is below 0.7x its own 1-thread figure:
    then the machine has fewer free cores than threads and the comparison says little."""
    warnings = []
    short = argparse.Namespace(**{**vars(args), "steps": max(3, args.steps // 3)})
    torch.set_num_threads(1)
    try:
        for side, runner in (("mmtune", run_mmtune), ("trl", run_trl)):
            data = train if side == "mmtune" else train_rows
            single = runner(model_dir, data, val_rows[:8], short, False)["tokens_per_s"]
            multi = runs[f"{side}_unpacked"][-1]["tokens_per_s"] if runs.get(f"{side}_unpacked") else None
            if multi is not None and multi < 0.7 * single:
                warnings.append(f"WARNING: {side} ran at {multi:.0f} tokens/s with {args.threads} threads but "
                                f"{single:.0f} with 1: too few free cores for {args.threads} threads; rerun with --threads 1")
    finally:
        torch.set_num_threads(args.threads)
    return warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local directory or .gguf (default: a tiny Llama built here)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine",
                        help="lr decay to 0 (the same formula on both sides, no warmup)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both sides (default 1: on a small or shared machine more threads "
                             "than free cores make parallel regions wait for descheduled threads, by different amounts "
                             "for the two sides; with more, each side is also run single-threaded and a warning is "
                             "printed when its figure is far below that)")
    parser.add_argument("--data", type=Path, default=None,
                        help="train on this file instead (any file TextData reads; the first 48 rows are held out "
                             "for the validation loss)")
    parser.add_argument("--trl_defaults", action="store_true",
                        help="leave SFTConfig's bf16 and gradient_checkpointing at TRL's defaults (not like for like)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per seed (training order and LoRA initialization); medians and means over them")
    parser.add_argument("--only", choices=["unpacked", "packed"], default=None, help="run one layout only")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    # Both sides in one process with the same settings: torch threads, and no tokenizer thread pool
    # competing with them (TRL tokenizes with the fast tokenizer before training, mmtune in its loader).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp())
    model_dir = args.model or str(tiny_model(root))
    data_rows = read_rows(args.data) if args.data else None
    val_rows = data_rows[:48] if data_rows else make_rows(48, 1)
    layouts = [k for k in ("unpacked", "packed") if args.only in (None, k)]
    runs: dict[str, list[dict]] = {f"{side}_{k}": [] for k in layouts for side in ("mmtune", "trl")}
    for seed in args.seeds:
        args.seed = seed
        train_rows = list(data_rows[48:]) if data_rows else make_rows(400, 0)
        random.Random(seed).shuffle(train_rows)  # the one shuffle; both sides then read in this order
        train = root / f"train_{seed}.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
        for key in layouts:
            runs[f"mmtune_{key}"].append(run_mmtune(model_dir, train, val_rows, args, key == "packed"))
            runs[f"trl_{key}"].append(run_trl(model_dir, train_rows, val_rows, args, key == "packed"))
            mm, trl = runs[f"mmtune_{key}"][-1], runs[f"trl_{key}"][-1]
            same = abs(mm["lora_init"] - trl["lora_init"]) <= 1e-9 * abs(trl["lora_init"])
            print(f"seed {seed} {key:8}: tokens/s mmtune {mm['tokens_per_s']:.0f} TRL {trl['tokens_per_s']:.0f}; val loss "
                  f"mmtune {mm['val_loss']:.4f} TRL {trl['val_loss']:.4f} ({mm['val_loss'] / trl['val_loss'] - 1:+.1%}); "
                  f"same initial LoRA weights: {'yes' if same else 'NO'}", flush=True)
    summary = {name: {"tokens": statistics.median(r["tokens"] for r in rs),
                      "seconds": statistics.median(r["seconds"] for r in rs),
                      "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "val_loss": statistics.fmean(r["val_loss"] for r in rs),
                      "val_loss_min": min(r["val_loss"] for r in rs), "val_loss_max": max(r["val_loss"] for r in rs)}
               for name, rs in runs.items()}
    base = summary.get("trl_unpacked", next(iter(summary.values())))["tokens_per_s"]
    warnings = single_thread_check(runs, model_dir, train, train_rows, val_rows, args) if args.threads > 1 else []
    print(f"\nover seeds {args.seeds}: median tokens/s, mean final validation loss (min-max)")
    print(f"{'run':18} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'vs TRL unpacked':>16} {'val loss':>9} {'vs TRL':>7}"
          f"  range")
    for name, r in summary.items():
        trl = summary[name.replace("mmtune", "trl")]
        print(f"{name:18} {r['tokens']:8.0f} {r['seconds']:8.1f} {r['tokens_per_s']:9.0f} {r['tokens_per_s'] / base:15.2f}x"
              f" {r['val_loss']:9.4f} {r['val_loss'] / trl['val_loss'] - 1:+7.1%}  {r['val_loss_min']:.4f}-{r['val_loss_max']:.4f}")
    for line in warnings:
        print(line)
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                        "summary": summary, "warnings": warnings}, indent=2))


if __name__ == "__main__":
    main()
