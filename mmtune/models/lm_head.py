"""The decoder body and output projection of a causal LM or decoder-only VLM, so a task can take the
final hidden states and compute its loss from them in chunks (`mmtune.losses.chunked`) instead of
letting the model build the full logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# Config fields of families whose logits are not a plain projection of the last hidden state
# (Gemma 2/3 soft-capping, Cohere's logit scale, Granite's divisor, MiniCPM's width scaling...).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "logit_softcapping",
                    "scale_width", "dim_model_base")


@dataclass
class SplitHead:
    """`body(**inputs).last_hidden_state` projected by `head` gives the model's logits."""

    body: nn.Module
    head: nn.Linear


def _configs(config) -> list:
    found = [config]
    for key in ("text_config", "language_config", "llm_config"):
        sub = getattr(config, key, None)
        if sub is not None:
            found.append(sub)
    return found


def split_head(net: nn.Module) -> Optional[SplitHead]:
    """The body and head of `net` (a transformers `*ForCausalLM` / `*ForConditionalGeneration`,
    optionally inside a peft model) when its logits are exactly `head(body(...))`, else None.

    None for: peft prompt-learning methods (they prepend virtual tokens in the wrapper's forward),
    a head that is not a plain `nn.Linear` (a LoRA-adapted or quantized lm_head), families that
    transform the logits (`LOGIT_TRANSFORMS`), encoder-decoders, and models without a `.model` body.
    """
    raw = net
    peft_config = getattr(net, "peft_config", None)
    if peft_config is not None and hasattr(net, "get_base_model"):
        active = peft_config.get(getattr(net, "active_adapter", "default"))
        if active is not None and getattr(active, "is_prompt_learning", False):
            return None
        raw = net.get_base_model()
    config = getattr(raw, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if any(getattr(c, key, None) not in (None, False) for c in _configs(config) for key in LOGIT_TRANSFORMS):
        return None
    body = getattr(raw, "model", None)
    head = raw.get_output_embeddings() if hasattr(raw, "get_output_embeddings") else None
    if not isinstance(body, nn.Module) or type(head) is not nn.Linear:
        return None
    return SplitHead(body, head)


def hidden_states(split: SplitHead, inputs: dict) -> torch.Tensor:
    """The final (normed) hidden states `[B, T, H]` of a batch."""
    return split.body(**inputs, use_cache=False).last_hidden_state
