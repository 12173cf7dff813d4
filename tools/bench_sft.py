"""SFT throughput and quality: mmtune against TRL's SFTTrainer in one run (TRL is a dev-only dependency).

Same model, data (mixed lengths, chat form, loss on assistant tokens), LoRA settings, optimizer, batch
size and number of steps; each side with and without packing. Reports trained tokens per second
(non-padding tokens seen by the model / wall time of the training call) and the final validation loss,
computed for every run by the same code (mmtune's tokenization, per-token loss on assistant tokens).

    python tools/bench_sft.py --steps 30            # tiny Llama built here, offline
    python tools/bench_sft.py --model path/to/model_or.gguf --steps 30
"""

from __future__ import annotations

import argparse
import json
import random
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


def tiny_model(root: Path) -> Path:
    """A 4-layer Llama (hidden 256) with a byte-level BPE tokenizer trained here and the ChatML template."""
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
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, initializer_range=0.1)
    out = root / "tiny_llama"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def val_loss(model, tokenizer, val_rows: list[dict], max_length: int) -> float:
    """Per-token loss on assistant tokens, the same code for every run."""
    from mmtune.data.text import Collator, Conversation, tokenize_conversation
    from mmtune.tasks.sft import causal_lm_loss

    items = [tokenize_conversation(tokenizer, Conversation(r["messages"], f"val {i}"), True) for i, r in enumerate(val_rows)]
    items = [type(x)(x.input_ids[:max_length], x.labels[:max_length]) for x in items]
    collate = Collator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), 16):
            batch = collate([[x] for x in items[start:start + 16]])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            t, c = causal_lm_loss(logits, batch["labels"])
            total, count = total + float(t), count + int(c)
    return total / count


def token_counter():
    """A Lightning callback counting non-padding tokens of mmtune's training batches and timing the
    training loop (from its start to its end: data reading and tokenization are outside, as for TRL)."""
    import lightning as L

    class Counter(L.Callback):
        tokens, start, seconds = 0, 0.0, 0.0

        def on_train_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.tokens += int(batch["num_tokens"])

        def on_train_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.start

    return Counter()


def run_mmtune(model_dir: str, train: Path, val_rows: list[dict], args, packing: bool) -> dict:
    import lightning as L

    from mmtune import AdapterSpec, CausalLMTask, ModelSpec, MonitorSpec, OptimizerSpec, TextData

    torch.manual_seed(0)
    task = CausalLMTask(ModelSpec(name=model_dir), AdapterSpec(method="lora", r=16, alpha=32),
                        OptimizerSpec(lr=args.lr, warmup=0, weight_decay=0.0, schedule="constant"),
                        MonitorSpec(early_stopping=False, save_best=False, save_last=False))
    dm = TextData(path=str(train), split=(1.0, 0.0, 0.0), max_length=args.max_length, batch_size=args.batch_size,
                  packing=packing)
    counter = token_counter()
    trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[counter], default_root_dir=tempfile.mkdtemp())
    trainer.fit(task, datamodule=dm)
    seconds = counter.seconds
    return {"tokens": counter.tokens, "seconds": seconds, "tokens_per_s": counter.tokens / seconds,
            "val_loss": val_loss(task.net, task.tokenizer, val_rows, args.max_length)}


def run_trl(model_dir: str, train_rows: list[dict], val_rows: list[dict], args, packing: bool) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from mmtune.models.hf import load_tokenizer
    from mmtune.specs import ModelSpec

    torch.manual_seed(0)
    tokenizer = load_tokenizer(ModelSpec(name=model_dir))  # the same template as mmtune uses
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = tempfile.mkdtemp()
    cfg = SFTConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                    learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                    max_length=args.max_length, packing=packing, assistant_only_loss=True, logging_steps=1,
                    save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0,
                    disable_tqdm=True)

    class Tokens(TrainerCallback):
        """TRL's own count of non-padding tokens, and the training loop's time."""

        def __init__(self):
            self.last, self.start, self.seconds = 0, 0.0, 0.0

        def on_train_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

        def on_log(self, a, state, control, logs=None, **kw):
            self.last = (logs or {}).get("num_tokens", self.last)

    tokens = Tokens()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(train_rows),
                         processing_class=tokenizer, peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
                         callbacks=[tokens])
    trainer.train()
    seconds = tokens.seconds
    return {"tokens": int(tokens.last), "seconds": seconds, "tokens_per_s": tokens.last / seconds,
            "val_loss": val_loss(trainer.model, tokenizer, val_rows, args.max_length)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local directory or .gguf (default: a tiny Llama built here)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp())
    model_dir = args.model or str(tiny_model(root))
    train_rows, val_rows = make_rows(400, 0), make_rows(48, 1)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    results = {}
    for packing in (False, True):
        key = "packed" if packing else "unpacked"
        results[f"mmtune_{key}"] = run_mmtune(model_dir, train, val_rows, args, packing)
        results[f"trl_{key}"] = run_trl(model_dir, train_rows, val_rows, args, packing)
    base = results["trl_unpacked"]["tokens_per_s"]
    print(f"{'run':18} {'tokens':>8} {'seconds':>8} {'tokens/s':>9} {'vs TRL unpacked':>16} {'val loss':>9}")
    for name, r in results.items():
        print(f"{name:18} {r['tokens']:8d} {r['seconds']:8.1f} {r['tokens_per_s']:9.0f} {r['tokens_per_s'] / base:15.2f}x"
              f" {r['val_loss']:9.4f}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
