#!/usr/bin/env python
"""Generation speed: mmtune's generation (as at validation, test and predict) against plain
`model.generate` on the same model, prompts and settings.

mmtune's side is a `CausalLMTask` as training leaves it: LoRA injected, activation checkpointing on,
train mode, caches off in the config; its `generate` must switch to eval, KV cache and no
checkpointing itself. The plain side loads the same weights with transformers and calls
`generate(use_cache=True)` in eval mode. Both decode greedily, batched, with the same stop tokens;
the texts must be equal (LoRA starts as a no-op). Tokens/s counts generated tokens (plain side's
count, the same texts) over wall time; the better of `--repeats` runs per side, sides alternating.

    python tools/bench_generate.py                   # tiny Llama built here, 8 prompts x 64 tokens
    python tools/bench_generate.py --model path/to/model_or.gguf --max_new_tokens 96
    python tools/bench_generate.py --quick           # a smoke run (the test suite)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fair_threads import HELP as THREADS_HELP, apply_threads  # noqa: E402  (tools/ is a folder of scripts)

PROMPTS = ["Say apple 5 times.", "Say kiwi 8 times.", "Name a fruit.", "Say red 3 times.", "Count to ten.",
           "Say dog 13 times.", "What color is a lemon?", "Say fig 21 times."]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local directory or .gguf (default: a tiny Llama built here)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    parser.add_argument("--quick", action="store_true", help="2 prompts x 8 tokens, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens, args.repeats = 2, 8, 1
    apply_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from bench_sft import tiny_model
    from mmtune import AdapterSpec, CausalLMTask, ModelSpec
    from mmtune.data.text_batches import PromptCollator
    from mmtune.data.text_reading import prompt_conversation
    from mmtune.models.hf import load_causal_lm, stop_token_ids
    from mmtune.tasks.sft import GenerationSpec

    model_dir = args.model or str(tiny_model(Path(tempfile.mkdtemp()), layers=2))
    spec = GenerationSpec(max_new_tokens=args.max_new_tokens)
    task = CausalLMTask(ModelSpec(name=model_dir), AdapterSpec(method="lora"), gradient_checkpointing=True,
                        generation=spec)
    task.configure_model()
    convs = [prompt_conversation(PROMPTS[i % len(PROMPTS)], f"prompt {i}") for i in range(args.prompts)]
    plain = load_causal_lm(ModelSpec(name=model_dir)).eval()
    tok = task.tokenizer
    batches = [PromptCollator(tok)(list(enumerate(convs[s:s + args.batch_size])))
               for s in range(0, len(convs), args.batch_size)]

    def run_plain() -> tuple[list[str], int]:
        texts, tokens = [], 0
        with torch.no_grad():
            for batch in batches:
                out = plain.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                                     eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
                new = out[:, batch["input_ids"].shape[1]:]
                tokens += int((new != tok.pad_token_id).sum())
                texts += tok.batch_decode(new, skip_special_tokens=True)
        return texts, tokens

    seconds = {"mmtune": [], "plain": []}
    results = {}
    for r in range(args.repeats):
        for side in (("mmtune", "plain") if r % 2 == 0 else ("plain", "mmtune")):
            start = time.perf_counter()
            results[side] = task.generate(convs, batch_size=args.batch_size) if side == "mmtune" else run_plain()
            seconds[side].append(time.perf_counter() - start)
    plain_texts, tokens = results["plain"]
    same = results["mmtune"] == plain_texts
    rates = {side: tokens / min(s) for side, s in seconds.items()}
    ratio = rates["mmtune"] / rates["plain"]
    print(f"{args.prompts} prompts x up to {args.max_new_tokens} new tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; {tokens} tokens generated; same texts: {'yes' if same else 'NO'}")
    print(f"mmtune {rates['mmtune']:.0f} tokens/s, plain generate {rates['plain']:.0f} tokens/s: {ratio:.2f}x")
    print(f"training state kept: train mode {task.net.training}, checkpointing "
          f"{any(getattr(m, 'gradient_checkpointing', False) for m in task.net.modules())}, "
          f"use_cache {task._raw().config.use_cache}")
    return {"tokens": tokens, "same_texts": same, "tokens_per_s": rates, "ratio": ratio,
            "training_state_kept": task.net.training and not task._raw().config.use_cache}


if __name__ == "__main__":
    main()
