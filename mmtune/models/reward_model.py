"""Reward models: a causal LM with a one-output sequence-classification head
(`AutoModelForSequenceClassification`, `num_labels=1`), scoring a conversation at its last token.

Built from the same local checkpoints (directories, GGUF files) as `mmtune.models.hf.load_causal_lm`;
the head is new when the source is a plain causal LM.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtune.models.hf import _dtype, _offline_error, refusing_custom_code, remote_code, resolve_hf_ref
from mmtune.specs import ModelSpec


def load_reward_model(spec: ModelSpec, pad_token_id: int | None = None) -> nn.Module:
    """`AutoModelForSequenceClassification` with one output from `spec` (random weights with
    `pretrained: false`); transformers warns that the head `score` is newly initialized."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    ref = resolve_hf_ref(spec)
    kwargs = {k: v for k, v in spec.kwargs.items() if k != "gguf_file"}
    code = remote_code(spec)
    try:
        with refusing_custom_code(spec):
            config = AutoConfig.from_pretrained(ref.path, **ref.kwargs(), **code)
            config.num_labels = 1
            if pad_token_id is not None:
                config.pad_token_id = pad_token_id
            if not spec.pretrained:
                return AutoModelForSequenceClassification.from_config(config, dtype=_dtype(spec), **code, **kwargs)
            return AutoModelForSequenceClassification.from_pretrained(ref.path, config=config, dtype=_dtype(spec),
                                                                      **ref.kwargs(), **code, **kwargs)
    except OSError as err:
        raise _offline_error(spec.name, err) from err


def sequence_scores(net: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One float32 score per row, read at its last attended token.

    transformers' own heads pool at the last token that is not `pad_token_id`, which goes wrong when
    the pad token is also the end-of-turn token a reply ends with; the attention mask says it exactly,
    so training and scoring both pool here (for heads named `score`, which the causal-LM families use).
    """
    raw = net.get_base_model() if hasattr(net, "get_base_model") else net
    head = getattr(raw, "score", None)
    if not isinstance(head, nn.Module):
        return net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()
    backbone = getattr(raw, raw.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(-1)
    return head(hidden[torch.arange(len(hidden), device=hidden.device), last]).squeeze(-1).float()
