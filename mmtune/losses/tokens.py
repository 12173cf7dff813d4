"""Token-level cross entropy of language-model heads (text SFT and vision-language tasks), with the
per-token mean taken over the global batch of every process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmtune.data.text_tokens import IGNORE


def token_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross entropy over labeled tokens (float32 logits), and their count. Decoder-only models
    predict the next token (`shift`); an encoder-decoder's logits line up with its labels."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    return total, (labels != IGNORE).sum()


def global_token_mean(total: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, its value as the per-token mean over the global batch).

    Processes hold different numbers of labeled tokens. Dividing by the local count and letting DDP or
    FSDP average the gradients would weight the tokens of a process with short answers more than those
    of one with long answers. Dividing by the global count and scaling by the world size gives the
    gradient of the per-token mean over the global batch, as one process holding it would compute (the
    normalization of transformers' `average_tokens_across_devices`). One all-reduce of two scalars.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        loss = total / count.clamp(min=1)
        return loss, loss.detach()
    sums = torch.stack([total.detach().float(), count.to(total.device, torch.float32)])
    dist.all_reduce(sums)
    tokens = sums[1].clamp(min=1)
    return total * dist.get_world_size() / tokens, sums[0] / tokens
