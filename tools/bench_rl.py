"""GRPO throughput and reward: mmtune's GRPOTask against TRL's GRPOTrainer in one run (TRL is dev-only).

Same model, prompts (in the same order: no shuffling on either side), reward function, group size,
completion length, sampling temperature, LoRA settings and initial weights (seeded right before the
adapters are injected; the script checks they match), optimizer, schedule, KL weight, clip range, loss
aggregation (`dapo`), gradient clipping (1.0) and number of steps, with the same torch thread count.

Reported per side:
- tokens/s: the prompt + completion tokens of every generation batch (what the step generates and then
  trains on; padding left out) / wall time of the training loop; generated tokens/s alone beside it;
- the mean training reward of the last 5 steps, and the reward of greedy answers to 16 held-out
  prompts after training, computed for both sides by the same code.
Over several `--seeds`, tokens/s is the median (one run on a busy machine can be several times slower),
rewards the mean, and the reward difference comes with a 95% bootstrap interval over the seeds: a tiny
model ends on one of two plateaus by chance, so a handful of seeds cannot tell the sides apart.

The toy task: prompts "Say a word: <w>", reward = share of the letter `a` in the completion (dense, so a
tiny model learns it in a few dozen steps).

    python tools/bench_rl.py --steps 40 --threads 1                  # tiny Llama built here, offline
    python tools/bench_rl.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --steps 10 --max_new_tokens 32
    python tools/bench_rl.py --quick                                   # a smoke run (tests/test_tools.py)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import warnings
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fair_threads import HELP as THREADS_HELP, apply_threads  # noqa: E402  (tools/ is a folder of scripts)

WORDS = ("apple banana cherry grape lemon mango olive peach pear plum kiwi lime melon berry fig date red green "
         "blue black white cat dog bird fish horse").split()


def a_share(completions, **_) -> list[float]:
    """The reward of both sides: the share of the letter `a` (TRL passes chat completions as turn lists)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [t.count("a") / max(len(t), 1) for t in texts]


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Say a word: {rng.choice(WORDS)}" for _ in range(n)]


def tiny_model(root: Path, hidden: int) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained here and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from mmtune.models.hf import CHAT_TEMPLATES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(prompts(300, 9) + [" ".join(WORDS), "user assistant system"] * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATES.get("chatml")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, initializer_range=0.2,
                      tie_word_embeddings=False)
    out = root / "tiny_llama"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def plain_copy(gguf: str, root: Path) -> Path:
    """A GGUF model dequantized once into a `save_pretrained` folder, so both sides load the same float
    weights (transformers marks a GGUF-loaded model as quantized, which its Trainer refuses to train)."""
    from mmtune.models.hf import load_causal_lm, load_tokenizer
    from mmtune.specs import ModelSpec

    spec = ModelSpec(name=gguf)
    model = load_causal_lm(spec)
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    out = root / "from_gguf"
    model.save_pretrained(out)
    load_tokenizer(spec).save_pretrained(out)
    return out


def lora_fingerprint(model) -> float:
    return float(sum(p.detach().double().abs().sum() * (i + 1) for i, (n, p) in
                     enumerate(sorted(model.named_parameters())) if "lora_" in n))


@torch.no_grad()
def greedy_reward(model, tokenizer, held_out: list[str], max_new_tokens: int) -> float:
    """Mean reward of greedy answers to held-out prompts: the same code for both sides."""
    from mmtune.data.text_batches import PromptCollator
    from mmtune.data.text_reading import Conversation
    from mmtune.models.hf import stop_token_ids

    batch = PromptCollator(tokenizer)([(i, Conversation([{"role": "user", "content": p}], str(i)))
                                       for i, p in enumerate(held_out)])
    model.eval()
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False,
                         max_new_tokens=max_new_tokens, eos_token_id=stop_token_ids(tokenizer),
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(a_share(texts)) / len(texts)


def run_mmtune(model_dir: str, train: Path, held_out: list[str], args) -> dict:
    import lightning as L

    from mmtune import AdapterSpec, GRPOSpec, GRPOTask, ModelSpec, MonitorSpec, OptimizerSpec, PromptData, RewardSpec

    task = GRPOTask(ModelSpec(name=model_dir), AdapterSpec(method="lora", r=16, alpha=32),
                    OptimizerSpec(lr=args.lr, warmup=0, weight_decay=0.0, schedule="linear"),
                    MonitorSpec(early_stopping=False, save_best=False, save_last=False),
                    grpo=GRPOSpec(num_generations=args.group, max_new_tokens=args.max_new_tokens, beta=args.beta,
                                  loss_type="dapo", max_grad_norm=1.0),
                    rewards=[RewardSpec(function="bench_rl:a_share", name="a_share")])
    L.seed_everything(args.seed, verbose=False)  # mmtune seeds each step's sampling from this (as `seed_everything: N` in a config)
    task.configure_model()
    init = lora_fingerprint(task.net)
    seen = {"tokens": 0, "generated": 0, "rewards": [], "threads": None}
    rollout = task.rollout

    def counted(batch):  # the tokens each generation batch generates and trains on
        r = rollout(batch)
        seen["tokens"] += int(r.attention_mask.sum())
        seen["generated"] += int(r.completion_mask.sum())
        seen["rewards"].append(float(r.rewards.mean()))
        return r

    task.rollout = counted

    class Clock(L.Callback):
        start = seconds = 0.0

        def on_train_start(self, trainer, module):
            seen["threads"] = torch.get_num_threads()
            self.start = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.start

    clock = Clock()
    dm = PromptData(path=str(train), split=(1.0, 0.0, 0.0), max_length=128, batch_size=args.prompts, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[clock], default_root_dir=tempfile.mkdtemp())
    trainer.fit(task, datamodule=dm)
    return {"tokens": seen["tokens"], "generated": seen["generated"], "seconds": clock.seconds,
            "tokens_per_s": seen["tokens"] / clock.seconds, "generated_per_s": seen["generated"] / clock.seconds,
            "lora_init": init, "threads": seen["threads"], "train_rewards": seen["rewards"],
            "held_out_reward": greedy_reward(task.net, task.tokenizer, held_out, args.max_new_tokens)}


def run_trl(model_dir: str, train_prompts: list[str], held_out: list[str], args) -> dict:
    import datasets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mmtune.models.hf import load_tokenizer
    from mmtune.specs import ModelSpec

    tokenizer = load_tokenizer(ModelSpec(name=model_dir))  # the same template as mmtune uses
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    init = lora_fingerprint(model)
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.prompts * args.group,
                     num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0,
                     learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                     beta=args.beta, epsilon=0.2, loss_type="dapo", scale_rewards="group", max_grad_norm=1.0,
                     shuffle_dataset=False, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     dataloader_num_workers=0, seed=args.seed, disable_tqdm=True, log_completions=False,
                     gradient_checkpointing=False)  # TRL's default recomputes activations; mmtune's does not

    class Log(TrainerCallback):
        def __init__(self):
            self.rewards, self.tokens, self.generated, self.start, self.seconds, self.threads = [], 0, 0, 0.0, 0.0, None

        def on_train_begin(self, a, state, control, **kw):
            self.threads = torch.get_num_threads()
            self.start = time.perf_counter()

        def on_train_end(self, a, state, control, **kw):
            self.seconds = time.perf_counter() - self.start

        def on_log(self, a, state, control, logs=None, **kw):
            logs = logs or {}
            if "reward" in logs:
                self.rewards.append(float(logs["reward"]))
                self.generated += round(float(logs["completions/mean_length"]) * args.prompts * args.group)
            self.tokens = int(logs.get("num_tokens", self.tokens))  # TRL's cumulative prompt + completion tokens

    log = Log()
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in train_prompts]
    trainer = GRPOTrainer(model=model, reward_funcs=[a_share], args=cfg, train_dataset=datasets.Dataset.from_list(rows),
                          processing_class=tokenizer, callbacks=[log])
    trainer.train()
    return {"tokens": log.tokens, "generated": log.generated, "seconds": log.seconds,
            "tokens_per_s": log.tokens / log.seconds, "generated_per_s": log.generated / log.seconds,
            "lora_init": init, "threads": log.threads, "train_rewards": log.rewards,
            "held_out_reward": greedy_reward(trainer.model, tokenizer, held_out, args.max_new_tokens)}


def paired_interval(differences: list[float], resamples: int = 10_000) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean of paired differences (one per seed: the same
    prompts and initial weights on both sides), on mmtune's seeded resampler. Percentiles, not a normal
    approximation: the toy task's outcome is bimodal (a run ends on one plateau or the other)."""
    import numpy as np

    from mmtune.evaluation.bootstrap import BootstrapSpec, resample_weights

    d = np.asarray(differences, dtype=float)
    means = np.concatenate([w @ d / len(d) for w in resample_weights(len(d), BootstrapSpec(resamples=resamples))])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def one_seed(model_dir: str, root: Path, args) -> dict:
    """Both sides on the prompts of `args.seed`."""
    train_prompts = prompts(args.steps * args.prompts, args.seed)
    train = root / f"prompts_{args.seed}.jsonl"
    train.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in train_prompts))
    held_out = prompts(16, 1000)
    torch.set_num_threads(args.threads)
    results = {"mmtune": run_mmtune(model_dir, train, held_out, args)}
    print(f"mmtune, seed {args.seed}: {results['mmtune']['tokens_per_s']:.0f} tokens/s", flush=True)
    torch.set_num_threads(args.threads)
    results["trl"] = run_trl(model_dir, train_prompts, held_out, args)
    for r in results.values():
        first, last = r["train_rewards"][:5], r["train_rewards"][-5:]
        r["reward_first5"], r["reward_last5"] = sum(first) / len(first), sum(last) / len(last)
        if r["threads"] != args.threads:
            warnings.warn(f"a side trained with {r['threads']} torch threads, not the {args.threads} asked for")
    mm, trl = results["mmtune"], results["trl"]
    results["same_lora_init"] = abs(mm["lora_init"] - trl["lora_init"]) <= 1e-9 * abs(trl["lora_init"])
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local directory or .gguf (default: a tiny Llama built here)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model")
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per seed (prompt order, LoRA initialization, sampling); means over them")
    parser.add_argument("--quick", action="store_true", help="3 steps, 2 prompts x 4 completions, 4 new tokens: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.group, args.max_new_tokens, args.prompts, args.seeds = 3, 4, 4, 2, args.seeds[:1]
    apply_threads(args.threads)
    import sys

    sys.path.insert(0, str(Path(__file__).parent))  # `bench_rl:a_share` for mmtune's reward spec
    root = Path(tempfile.mkdtemp())
    model_dir = args.model or str(tiny_model(root, args.hidden))
    if model_dir.lower().endswith(".gguf"):
        model_dir = str(plain_copy(model_dir, root))
    runs = []
    header = (f"{'seed':>4} {'side':7} {'threads':>7} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'generated/s':>12} "
              f"{'reward first 5':>15} {'last 5':>7} {'held-out':>9}")
    for seed in args.seeds:
        args.seed = seed
        runs.append(one_seed(model_dir, root, args))
        print(header)
        for name in ("mmtune", "trl"):
            r = runs[-1][name]
            print(f"{seed:4} {name:7} {r['threads']:7} {r['tokens']:7} {r['seconds']:8.1f} {r['tokens_per_s']:9.0f} "
                  f"{r['generated_per_s']:12.0f} {r['reward_first5']:15.3f} {r['reward_last5']:7.3f} "
                  f"{r['held_out_reward']:9.3f}  same initial LoRA weights: {'yes' if runs[-1]['same_lora_init'] else 'NO'}",
                  flush=True)
    # Throughput: the median over seeds (a shared machine gives the odd run a several-fold slowdown);
    # rewards: the mean.
    summary = {name: {**{key: statistics.median(run[name][key] for run in runs) for key in ("tokens_per_s", "generated_per_s")},
                      **{key: statistics.fmean(run[name][key] for run in runs)
                         for key in ("reward_first5", "reward_last5", "held_out_reward")}}
               for name in ("mmtune", "trl")}
    mm, trl = summary["mmtune"], summary["trl"]
    print(f"\n{args.steps} steps, {args.prompts} prompts x {args.group} completions, up to {args.max_new_tokens} new "
          f"tokens, {args.threads} thread(s), over seeds {args.seeds} (tokens/s: median, rewards: mean):")
    for name, r in summary.items():
        print(f"{name:7} tokens/s {r['tokens_per_s']:8.0f}  generated/s {r['generated_per_s']:7.0f}  reward first 5 steps "
              f"{r['reward_first5']:.3f} -> last 5 {r['reward_last5']:.3f}  held-out greedy {r['held_out_reward']:.3f}")
    print(f"mmtune / TRL tokens/s: {mm['tokens_per_s'] / trl['tokens_per_s']:.2f}x (medians); per seed: "
          + ", ".join(f"{run['mmtune']['tokens_per_s'] / run['trl']['tokens_per_s']:.2f}x" for run in runs))
    if len(runs) > 1:
        # Equal reward is a statement about the distribution over seeds: each seed ends on a plateau
        # (0.2 or 0.5 in the toy task) by chance, so compare the paired mean difference with its interval.
        for key, label in (("held_out_reward", "held-out greedy"), ("reward_last5", "last 5 steps")):
            diffs = [run["mmtune"][key] - run["trl"][key] for run in runs]
            low, high = paired_interval(diffs)
            summary.setdefault("difference", {})[key] = {"mean": statistics.fmean(diffs), "ci95": [low, high]}
            verdict = "equal within the interval" if low <= 0 <= high else ("mmtune higher" if low > 0 else "TRL higher")
            print(f"reward ({label}), mmtune - TRL over {len(diffs)} seeds: {statistics.fmean(diffs):+.3f}, "
                  f"95% interval [{low:+.3f}, {high:+.3f}]: {verdict}")
    if args.threads > 1 and not args.quick:
        # Threads on a shared machine can cost more than they give: compare with one thread, briefly.
        single = argparse.Namespace(**{**vars(args), "steps": min(args.steps, 5), "threads": 1, "seed": args.seeds[0]})
        one = one_seed(model_dir, root, single)
        torch.set_num_threads(args.threads)
        for name in ("mmtune", "trl"):
            summary[name]["single_thread_tokens_per_s"] = one[name]["tokens_per_s"]
            if summary[name]["tokens_per_s"] < 0.8 * one[name]["tokens_per_s"]:
                warnings.warn(f"{name}: {summary[name]['tokens_per_s']:.0f} tokens/s with {args.threads} threads is far "
                              f"below its {one[name]['tokens_per_s']:.0f} with one: the cores are busy; compare with "
                              "--threads 1")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                        "summary": summary}, indent=2))
    return {**runs[0], "summary": summary}


if __name__ == "__main__":
    main()
