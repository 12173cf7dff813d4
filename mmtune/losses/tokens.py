"""Token-level cross entropy of language-model heads (text SFT and vision-language tasks), with the
per-token mean taken over the global batch of every process."""

from __future__ import annotations

from typing import Optional

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


def token_loss_per_row(logits: torch.Tensor, labels: torch.Tensor, row_ids: Optional[torch.Tensor] = None,
                       rows: Optional[int] = None, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_loss` split by sample: the summed cross entropy over each sample's labeled tokens and
    their count, as two `[rows]` tensors (float32 sums, int64 counts).

    A packed batch row holds several samples, so the batch row does not say whose a token is:
    `row_ids` (`[B, T]`, the sample index of every token, negative on padding) does; without it each
    batch row is one sample. A token's loss belongs to the sample of the token it predicts (the
    shifted label), and the first token of each packed sample carries no label, so no loss crosses
    samples. The per-sample sums add up to `token_loss`'s total (up to float32 summation order).

    Args:
        logits: `[B, T, V]`.
        labels: `[B, T]`, `IGNORE` where no loss.
        row_ids: `[B, T]` sample index of each token (None: the batch row).
        rows: number of samples (default: the largest id + 1).
        shift: next-token prediction (decoder-only); False for an encoder-decoder's aligned logits.
    """
    if row_ids is None:
        row_ids = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    if shift:
        logits, labels, row_ids = logits[:, :-1], labels[:, 1:], row_ids[:, 1:]
    per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                                reduction="none")
    ids = row_ids.reshape(-1).to(per_token.device)
    keep = (labels.reshape(-1) != IGNORE) & (ids >= 0)
    n = int(rows) if rows is not None else int(ids[keep].max()) + 1 if keep.any() else 0
    ids = ids[keep]
    sums = torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add_(0, ids, per_token[keep])
    counts = torch.zeros(n, dtype=torch.long, device=per_token.device).index_add_(0, ids, torch.ones_like(ids))
    return sums, counts


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
