"""How a vision-language task generates answers: the decoding settings, and where the answer starts in
what `generate` returns (the prompt first, as sent or as the family edited it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class DecodingSpec:
    """How answers are generated at validation, test and predict.

    Args:
        max_new_tokens: longest generated answer.
        num_beams: beam search width (1: greedy unless sampling).
        do_sample: sample with `temperature` and `top_p` instead of searching.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        repetition_penalty: >1 discourages repeating tokens (long reports).
        val_samples: generate for this many validation samples per validation (None: all, 0: none,
            only the loss): a seeded sample spread over answer types (each type at least once, the rest
            in proportion), the same at every validation and on every process, so that validations
            compare; test and predict always generate for every sample.
        val_samples_seed: seed of that sample.
    """

    max_new_tokens: int = 64
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    val_samples: Optional[int] = None
    val_samples_seed: int = 0

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample,
                      repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs


def answer_start(out: torch.Tensor, prompt_ids: torch.Tensor, edited: Optional[torch.Tensor]) -> int:
    """How many leading positions of `out` repeat the prompt (generate returns prompt + answer; some
    families drop or replace prompt tokens first, so the prompt as sent and as edited are both tried)."""
    best = 0
    for ids in (prompt_ids, edited):
        if ids is None:
            continue
        n = min(ids.shape[1], out.shape[1])
        same = (out[:, :n] == ids[:, :n]).all(0)
        k = int(same.long().cumprod(0).sum()) if n else 0
        best = max(best, k)
    return best
