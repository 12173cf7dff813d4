"""Token cross entropy straight from the final hidden states and the output projection, in chunks of
tokens, so the `[batch, length, vocabulary]` logits never exist in full.

With a 150k-token vocabulary the logits of a batch of 8 x 1024 tokens take 4.9 GB in float32, and the
plain loss holds several such tensors at once (the logits, their float32 copy, the log-softmax, its
gradient): they, not the model, set the peak memory of LLM and VLM fine-tuning. Here only the
positions that carry a label are projected at all (prompt and padding tokens need no logits), a chunk
of them at a time.

Training (`linear_token_loss`) uses one `autograd.Function` that computes the loss and its gradients
with respect to the hidden states, the head weight and bias chunk by chunk in the forward pass (the
approach of Liger's fused linear cross entropy, written here in plain torch so it runs on every
device): the backward only scales them, so nothing is recomputed. Liger's Triton kernel is used
instead when it is installed and the tensors are on a GPU. Per-token losses with arbitrary upstream
gradients (`linear_token_losses`, e.g. DPO's sequence log-probabilities) recompute each chunk in the
backward (`torch.utils.checkpoint`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mmtune.data.text_tokens import IGNORE

# Logits per chunk. CPU: 32 MB in float32 (55 tokens at a 150k vocabulary): the loss then peaks at about
# 3 chunks (logits, log-sum-exp temporaries), ~100 MB; 4x smaller chunks cost ~25% more loss time.
# GPU: 128 MB (220 tokens), where larger matmuls keep the device busy and 128 MB is little.
CHUNK_ELEMENTS = 2 ** 23
CHUNK_ELEMENTS_CUDA = 2 ** 25


def chunk_tokens(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk for a vocabulary: a fixed logits budget, at least 16 tokens, at most 8192."""
    budget = CHUNK_ELEMENTS_CUDA if torch.device(device).type == "cuda" else CHUNK_ELEMENTS
    return max(16, min(8192, budget // max(vocab_size, 1)))


def labelled_positions(hidden: torch.Tensor, labels: torch.Tensor, shift: bool,
                       row_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states `[K, H]`, their target labels `[K]`, their sample ids `[K]`) of the K positions
    whose (shifted) label is not IGNORE: the only ones whose logits the loss needs."""
    if row_ids is None:
        row_ids = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)
    if shift:
        hidden, labels, row_ids = hidden[:, :-1], labels[:, 1:], row_ids[:, 1:]
    labels, row_ids = labels.to(hidden.device), row_ids.to(hidden.device)
    keep = (labels != IGNORE) & (row_ids >= 0)
    return hidden[keep], labels[keep], row_ids[keep]


class _LinearCrossEntropySum(torch.autograd.Function):
    """Summed cross entropy of `hidden @ weight.T + bias` against `labels` (all valid), with the
    gradients computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):  # noqa: D401 - autograd signature
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(y), device=y.device), y] -= 1.0
            if need_b:
                grad_b += grad.sum(0)
            grad = grad.to(hidden.dtype)
            if need_h:
                grad_h[start:start + chunk] = grad @ weight
            if need_w:
                grad_w += (grad.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * grad_total).to(w_dtype) if grad_w is not None else None,
                (grad_b * grad_total).to(b_dtype) if grad_b is not None else None, None, None)


def _liger_sum(hidden, weight, bias, labels):
    """Liger's fused linear cross entropy (Triton, GPU only), or None where it cannot run."""
    if not hidden.is_cuda:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")(weight, hidden, labels, bias)


def linear_token_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                      shift: bool = True, chunk: Optional[int] = None,
                      use_liger: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`mmtune.losses.tokens.token_loss` of the logits `hidden @ weight.T + bias` without building them:
    the summed cross entropy over labelled tokens (float32) and their count.

    Args:
        hidden: final hidden states `[B, T, H]` (after the last norm).
        weight, bias: the output projection (`[V, H]`, `[V]` or None).
        labels: `[B, T]`, IGNORE where no loss.
        shift: next-token prediction (decoder-only).
        chunk: tokens per chunk (default: `chunk_tokens(V)`).
        use_liger: Liger's kernel where installed and on a GPU.
    """
    h, y, _ = labelled_positions(hidden, labels, shift)
    count = torch.tensor(len(y), device=labels.device)
    if use_liger and len(y):
        fused = _liger_sum(h, weight, bias, y)
        if fused is not None:
            return fused.float(), count
    return _LinearCrossEntropySum.apply(h, weight, bias, y, chunk or chunk_tokens(weight.shape[0], h.device)), count


def _chunk_losses(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight, bias).float(), y, reduction="none")


def linear_token_losses(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], y: torch.Tensor,
                        chunk: Optional[int] = None) -> torch.Tensor:
    """Per-token cross entropy `[K]` of the selected positions (`labelled_positions`), chunk by chunk;
    with gradients each chunk's logits are recomputed in the backward instead of kept."""
    chunk = chunk or chunk_tokens(weight.shape[0], h.device)
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    parts = [checkpoint(_chunk_losses, h[s:s + chunk], weight, bias, y[s:s + chunk], use_reentrant=False) if grad
             else _chunk_losses(h[s:s + chunk], weight, bias, y[s:s + chunk]) for s in range(0, len(y), chunk)]
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def linear_token_loss_per_row(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                              labels: torch.Tensor, row_ids: Optional[torch.Tensor] = None, rows: Optional[int] = None,
                              shift: bool = True, chunk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`mmtune.losses.tokens.token_loss_per_row` from hidden states: per-sample summed losses and counts."""
    h, y, ids = labelled_positions(hidden, labels, shift, row_ids)
    per_token = linear_token_losses(h, weight, bias, y, chunk)
    n = int(rows) if rows is not None else int(ids.max()) + 1 if len(ids) else 0
    sums = torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add_(0, ids, per_token)
    counts = torch.zeros(n, dtype=torch.long, device=per_token.device).index_add_(0, ids, torch.ones_like(ids))
    return sums, counts
