"""Contrastive image-text (and text-text) losses: CLIP's symmetric InfoNCE and SigLIP's sigmoid loss.

Both take `rank` and `world_size` explicitly (open_clip's `ClipLoss` style) instead of reading the
process group themselves, so the same object works on one process, under DDP, and in tests that
spawn processes by hand.

Under several processes each one gathers every process's embeddings *with gradients*
(`torch.distributed.nn.functional.all_gather`) and scores its own rows against the global batch
("local loss"). The average of the processes' losses is then the one-process loss on the global
batch, and DDP's gradient averaging gives the one-process gradient: the all-gather's backward sums the
gradients that other processes' rows send back to this process's embeddings.

Duplicates: two rows of a batch may share a caption (or an image). Scoring them as negatives would
push identical texts apart (false negatives). Rows are therefore given keys (`image_keys`,
`text_keys`); every pair whose image or text key matches is a positive: InfoNCE spreads its target
evenly over the positives of a row (soft targets, scored as KL divergence so the optimum is 0), the
sigmoid loss labels them +1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from mmtune.errors import DataError

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) here so the temperature cannot collapse


def gather(x: torch.Tensor, world_size: int, with_grad: bool = True) -> torch.Tensor:
    """Concatenates `x` from every process in rank order (with gradients unless `with_grad` is False)."""
    if world_size == 1:
        return x
    if with_grad:
        import torch.distributed.nn.functional as dist_fn

        return torch.cat(dist_fn.all_gather(x.contiguous()), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def positive_mask(row_keys: tuple[torch.Tensor, ...], col_keys: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Boolean [rows, cols] matrix: True where any pair of keys (image key, text key, ...) is equal."""
    mask = None
    for r, c in zip(row_keys, col_keys):
        eq = r[:, None] == c[None, :]
        mask = eq if mask is None else mask | eq
    return mask


def _check_batch(global_size: int) -> None:
    if global_size < 2:
        raise DataError(
            f"a contrastive loss needs at least 2 pairs per batch (over all processes) and got {global_size}: "
            "every other pair is a negative, so with one pair there is nothing to contrast. Raise "
            "data.batch_size, or give the split at least 2 pairs"
        )


class _Contrastive(torch.nn.Module):
    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def _global(self, image: torch.Tensor, text: torch.Tensor, keys: tuple[torch.Tensor, ...],
                negatives: Optional[torch.Tensor] = None, negative_keys: Optional[torch.Tensor] = None):
        """Gathered embeddings, and which (local row, global document) pairs are positive.

        Documents are every process's texts, then every process's hard negatives (if any); a hard
        negative is positive only when its key equals the row's text key (the last of `keys`)."""
        n_local = image.shape[0]
        all_image = gather(image, self.world_size)
        all_text = gather(text, self.world_size)
        _check_batch(all_text.shape[0])
        rows = slice(self.rank * n_local, (self.rank + 1) * n_local)
        if keys:
            all_keys = tuple(gather(k, self.world_size, with_grad=False) for k in keys)
            pos = positive_mask(tuple(k[rows] for k in all_keys), all_keys)
        else:
            pos = torch.zeros(n_local, all_text.shape[0], dtype=torch.bool, device=image.device)
        # a row's own pair is always positive (also when no keys are given)
        own = torch.arange(n_local, device=image.device) + self.rank * n_local
        pos[torch.arange(n_local, device=image.device), own] = True
        docs, doc_pos = all_text, pos
        if negatives is not None:
            all_neg = gather(negatives, self.world_size)
            neg_pos = torch.zeros(n_local, all_neg.shape[0], dtype=torch.bool, device=image.device)
            if keys and negative_keys is not None:
                neg_pos = positive_mask((all_keys[-1][rows],), (gather(negative_keys, self.world_size, with_grad=False),))
            docs, doc_pos = torch.cat([all_text, all_neg]), torch.cat([pos, neg_pos], dim=1)
        return all_image, docs, pos, doc_pos


def _soft_ce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) with the target spread evenly over each row's positives: cross
    entropy minus the target's entropy, so the loss is 0 at the optimum also for rows with duplicates
    (the gradient is soft-target cross entropy's)."""
    target = pos.float() / pos.sum(dim=1, keepdim=True)
    entropy = -(target * target.clamp_min(1e-12).log()).sum(dim=1)
    return (-(target * F.log_softmax(logits, dim=1)).sum(dim=1) - entropy).mean()


class ClipLoss(_Contrastive):
    """Symmetric InfoNCE (CLIP): cross entropy over the global batch, image->text and text->image.

    Args:
        rank: this process's rank.
        world_size: number of processes (1: no gathering).
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                keys: tuple[torch.Tensor, ...] = (), logit_bias: Optional[torch.Tensor] = None,
                negatives: Optional[torch.Tensor] = None, negative_keys: Optional[torch.Tensor] = None,
                directions: tuple[str, str] = ("i2t", "t2i")) -> dict[str, torch.Tensor]:
        """Args:
            image, text: L2-normalized local embeddings [n, d]; row i of each forms a pair.
            logit_scale: log of the inverse temperature (learnable); exp is clamped at 100.
            keys: per-row int64 keys (e.g. image and text hashes) marking duplicate pairs as positives.
            logit_bias: ignored (accepted so both losses share a signature).
            negatives: hard-negative text embeddings [n, d] (one per row), extra documents for the
                image (query) -> text direction; `negative_keys` their text keys.
            directions: names of the image -> text and text -> image terms, the prefixes of the
                retrieval metrics (`q2d`, `d2q` for query-document data) so both stages share names.

        Returns:
            the two direction terms (each half the symmetric loss), `i2t` and `t2i` by default.
        """
        all_image, docs, pos, doc_pos = self._global(image, text, keys, negatives, negative_keys)
        scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
        logits_i2t = scale * image @ docs.T  # local images vs every text (and hard negative)
        logits_t2i = scale * text @ all_image.T  # local texts vs every image; the mask is symmetric
        return {directions[0]: 0.5 * _soft_ce(logits_i2t, doc_pos), directions[1]: 0.5 * _soft_ce(logits_t2i, pos)}


class SigLipLoss(_Contrastive):
    """Pairwise sigmoid loss (SigLIP): each (image, text) pair of the global batch is a binary
    problem, positive or negative; summed over texts and averaged over images.

    Args:
        rank: this process's rank.
        world_size: number of processes (1: no gathering).
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                keys: tuple[torch.Tensor, ...] = (), logit_bias: Optional[torch.Tensor] = None,
                negatives: Optional[torch.Tensor] = None, negative_keys: Optional[torch.Tensor] = None,
                directions: tuple[str, str] = ("i2t", "t2i")) -> dict[str, torch.Tensor]:
        """Args as `ClipLoss`; `logit_bias` is the learnable bias (SigLIP initializes it at -10).
        `directions` is accepted for the shared signature: every pair is scored once, in no direction.

        Returns:
            the `sigmoid` term.
        """
        _, docs, _, pos = self._global(image, text, keys, negatives, negative_keys)
        logits = logit_scale.exp() * image @ docs.T
        if logit_bias is not None:
            logits = logits + logit_bias
        labels = 2.0 * pos.float() - 1.0
        return {"sigmoid": -F.logsigmoid(labels * logits).sum() / image.shape[0]}


LOSSES = {"infonce": ClipLoss, "sigmoid": SigLipLoss}
