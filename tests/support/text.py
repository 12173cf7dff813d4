"""Tiny causal LMs and tokenizers built here (no hub), saved like a user's checkpoint, and text data."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("apple banana cherry grape lemon mango olive peach pear plum kiwi lime melon berry fig date "
         "red green blue black white cat dog bird fish horse").split()
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<pad>"]

# A Llama-3-like template without {% generation %} markers: assistant tokens are found by prefixes.
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '[' + message['role'] + ']: ' + message['content'] + '</s>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant]: ' }}{% endif %}"
)


def repeat_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows: repeat a word three times (learnable by a 2-layer model in a few dozen steps)."""
    rng = random.Random(seed)
    return [{"instruction": "Repeat the word three times.", "input": w, "output": f"{w} {w} {w}"}
            for w in (rng.choice(WORDS) for _ in range(n))]


def corpus() -> list[str]:
    rows = repeat_rows(200)
    text = [f"{r['instruction']} {r['input']} {r['output']}" for r in rows]
    return text + [" ".join(WORDS)] * 5 + ["[user]: [assistant]: [system]: user assistant system Hello hi"] * 5


def build_tokenizer(template: str | None, bos: str | None, eos: str):
    """A byte-level BPE tokenizer trained on the test vocabulary, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   unk_token=None)
    if template:
        fast.chat_template = template
    return fast


def build_model(kind: str, root: Path) -> Path:
    """Saves a 2-layer Llama (own template without generation markers) or Qwen2 (no template: mmtune
    falls back to ChatML) with its tokenizer in `root/kind`."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    if kind == "llama":
        tok = build_tokenizer(LLAMA_TEMPLATE, bos="<s>", eos="</s>")
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=False, initializer_range=0.2)
    elif kind == "qwen2":
        tok = build_tokenizer(None, bos=None, eos="<|endoftext|>")
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
                          initializer_range=0.2)
    else:
        raise ValueError(kind)
    # With the default 0.02 init a frozen random lm_head caps the logits near zero, so LoRA could not
    # lower the loss much; pretrained heads have larger norms.
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg)
    out = root / kind
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def sft_config(path: Path, model_dir: Path, data: dict, model_args: dict | None = None, trainer: dict | None = None) -> Path:
    """A complete SFT config, the way users write them."""
    import yaml

    config = {
        "model": {"class_path": "CausalLMTask",
                  "init_args": {"model": {"name": str(model_dir)}, "adapter": {"method": "lora", "r": 8, "alpha": 16},
                                "optimizer": {"lr": 0.01, "warmup": 0.1, "weight_decay": 0.0}, **(model_args or {})}},
        "data": {"class_path": "TextData", "init_args": {"batch_size": 8, "max_length": 64, **data}},
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "enable_progress_bar": False,
                    "enable_model_summary": False, **(trainer or {})},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
