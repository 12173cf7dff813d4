"""An exported reward model (`mmtune export` of a `RewardModelTask` run) used as a GRPO reward."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from mmtune.errors import ConfigError
from mmtune.models.reward_model import load_reward_model, sequence_scores
from mmtune.specs import ModelSpec


def text_turns(turns: Sequence[dict]) -> list[dict]:
    """Turns with plain-text content: a VLM prompt's structured content (`[{"type": "image"}, {"type":
    "text", ...}]`) keeps its text parts, since a text reward model scores the question and the answer
    and cannot see the image (a template would otherwise render the list itself)."""
    out = []
    for turn in turns:
        content = turn.get("content")
        if isinstance(content, (list, tuple)):
            content = " ".join(part["text"] for part in content if isinstance(part, dict) and part.get("type") == "text")
        out.append({**turn, "content": content})
    return out


class RewardModelScorer:
    """Scores (prompt turns, completion) with a reward model folder, in batches, without gradients.

    Args:
        path: the export folder (`config.json`, safetensors weights, tokenizer with its chat template).
        device: where to run it (the policy's device).
        batch_size: completions scored per forward pass.
        max_length: longest scored conversation in tokens (longer ones keep their start).
    """

    def __init__(self, path: str, device: Optional[torch.device] = None, batch_size: int = 16,
                 max_length: int = 2048) -> None:
        from transformers import AutoTokenizer

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"reward model {path!r} is not a model folder (no config.json); export a reward model "
                              "run with `mmtune export --ckpt_path ... --out DIR` and name DIR")
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_reward_model(ModelSpec(name=str(folder))).eval().requires_grad_(False)
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        self.batch_size, self.max_length = batch_size, max_length

    def text(self, prompt: Sequence[dict], completion: str) -> str:
        turns = text_turns(prompt) + [{"role": "assistant", "content": completion}]
        return self.tokenizer.apply_chat_template(turns, tokenize=False)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Sequence[dict]], completions: Sequence[str], **_) -> list[float]:
        texts = [self.text(p, c) for p, c in zip(prompts, completions)]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "right"
        scores: list[float] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True, max_length=self.max_length, add_special_tokens=False)
                scores += sequence_scores(self.model, enc["input_ids"].to(self.device),
                                          enc["attention_mask"].to(self.device)).tolist()
        finally:
            self.tokenizer.padding_side = side
        return scores
