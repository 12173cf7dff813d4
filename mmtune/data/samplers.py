"""A sampler whose order depends only on (seed, epoch): resumed runs see the same batches as
uninterrupted ones, and it shards itself across processes.

It yields `(epoch, index)` keys so the dataset can seed each sample's augmentation from
(seed, epoch, index): augmentations then do not depend on worker count, on process, or on how many
random draws Lightning made before the epoch (which differs when a run resumes).

`ResumableLoader` continues an interrupted epoch with the batches the uninterrupted run would have drawn.

`stratified_sample` picks a fixed, seeded subset spread over strata (validation generation samples).
"""

from __future__ import annotations

import random
from typing import Hashable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler


class EpochSampler(DistributedSampler):
    """Shuffled (or class-balanced, with `weights`) sampling, seeded by (seed, epoch), sharded by rank;
    with `shuffle=False` the data's own order (curricula, or matching another tool's run step by step).

    It subclasses `DistributedSampler` so Lightning calls `set_epoch` on it and does not wrap it
    again under DDP; on one process it is an ordinary seeded shuffle.

    Args:
        length: dataset size.
        seed: base seed.
        weights: per-item sampling weights; draws `length` items with replacement when given.
        num_replicas: world size (1 without distributed training).
        rank: this process's rank.
        shuffle: False keeps the data's order (ignored with `weights`, which always draw at random).
    """

    def __init__(self, length: int, seed: int, weights: Optional[Sequence[float]] = None,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True) -> None:
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.weights = torch.as_tensor(weights, dtype=torch.double) if weights is not None else None
        self._skip: Optional[tuple[int, int]] = None  # (epoch, items) to leave out once, when resuming mid-epoch

    def skip_once(self, epoch: int, items: int) -> None:
        """The next pass over `epoch` leaves out its first `items` keys (already trained on before a resume)."""
        self._skip = (epoch, items)

    @classmethod
    def for_this_process(cls, length: int, seed: int, weights: Optional[Sequence[float]] = None,
                         shuffle: bool = True) -> "EpochSampler":
        """Sharded for this process when torch.distributed is running (Lightning has set it up by the
        time it asks for the train loader), else over the whole data."""
        world, rank = 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        return cls(length, seed, weights, world, rank, shuffle)

    def no_single_item_batch(self, batch_size: int) -> "EpochSampler":
        """Pads this process's share by one more row (from the epoch's start, as `DistributedSampler`
        pads a shard) when it would otherwise end in a batch of one: every row still trains each epoch,
        the last short batch included, but BatchNorm in train mode refuses a batch of one and a
        contrastive loss has no negatives in it. All processes pad alike, so they keep equal batch counts."""
        if batch_size > 1 and self.num_samples % batch_size == 1:
            self.num_samples += 1
            self.total_size = self.num_samples * self.num_replicas
        return self

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.weights is None:
            order = list(super().__iter__())
        else:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.multinomial(self.weights, self.total_size, replacement=True, generator=g).tolist()
            order = order[self.rank:self.total_size:self.num_replicas]
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1]:]
        self._skip = None
        return iter([(self.epoch, i) for i in order])


class ResumableLoader(DataLoader):
    """A training loader over an `EpochSampler` that resumes mid-epoch exactly where it stopped.

    Lightning saves the `state_dict()` of a loader that has one into checkpoints and gives it back
    through `load_state_dict` before a resumed fit iterates; a plain DataLoader has none, so a fit
    resumed from a mid-epoch checkpoint (one saved on SIGTERM, or by a validation inside the epoch)
    would start the epoch's batches over. The state is (epoch, batches handed out in it): as the
    sampler's order depends only on (seed, epoch), leaving out that many batches' keys continues with
    the very batches the uninterrupted run drew next, without loading the skipped samples. Lightning
    takes batches from a sized loader one at a time (no prefetch), so the count is what the loop used.

    Iteration starts at the first batch asked for, after Lightning has set the sampler's epoch, so
    worker processes never start on the previous epoch's order.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise TypeError("ResumableLoader needs an EpochSampler (its order must depend only on seed and epoch)")
        self._position = (0, 0)  # (epoch, batches handed out in it)
        self._resume: Optional[tuple[int, int]] = None

    def __iter__(self) -> Iterator:
        return self._batches()

    def _batches(self) -> Iterator:
        epoch, done = self.sampler.epoch, 0
        if self._resume is not None and self._resume[0] == epoch:
            done = self._resume[1]
            self.sampler.skip_once(epoch, done * self.batch_size)
        self._resume = None
        self._position = (epoch, done)
        for batch in super().__iter__():
            done += 1
            self._position = (epoch, done)
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self._position[0], "batches": self._position[1]}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        # a checkpoint from the end of an epoch resumes at the next one, from its start
        self._resume = (epoch, batches) if 0 < batches < len(self) else None


def seed_everything_from(*parts: int, accelerators: bool = False) -> None:
    """Seeds python, numpy and torch's CPU RNGs from a tuple of integers (a stable hash of them).

    `torch.manual_seed` is avoided on purpose: before CUDA is initialized it queues a lazy CUDA/XPU/MTIA
    seed call that records a stack trace each time (about 1 ms), which per sample cost more than the
    augmentation. With `accelerators`, initialized CUDA generators are seeded too (model RNG on GPUs).
    """
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**31 - 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    if accelerators and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def stratified_sample(strata: Sequence[Hashable], n: int, seed: int) -> list[int]:
    """Positions of `n` items spread over their strata (e.g. answer types), the same for the same
    inputs on every process. Strata get items in proportion to their sizes (largest remainder), so the
    sample's mix stays the data's, and each gets at least one when `n` allows (from the largest
    shares); within a stratum, items come from a seeded shuffle. Sorted; every position when
    `n >= len(strata)`.
    """
    if n >= len(strata):
        return list(range(len(strata)))
    if n <= 0:
        return []
    groups: dict[Hashable, list[int]] = {}
    for i, stratum in enumerate(strata):
        groups.setdefault(stratum, []).append(i)
    names = sorted(groups, key=lambda s: (s is None, str(s)))  # not the data's order: any row order gives one set
    rng = random.Random(seed)
    for name in names:
        rng.shuffle(groups[name])
    if n < len(names):  # fewer items than strata: one from each of the n largest
        return sorted(groups[name][0] for name in sorted(names, key=lambda s: -len(groups[s]))[:n])
    # exact integer shares; n < len(strata), so no stratum's share reaches its size
    shares = {name: divmod(n * len(groups[name]), len(strata)) for name in names}
    quota = {name: shares[name][0] for name in names}
    for name in sorted(names, key=lambda s: -shares[s][1])[:n - sum(quota.values())]:
        quota[name] += 1
    for name in names:
        if quota[name] == 0:  # n >= len(names), so some other stratum has two or more to give
            donor = max(names, key=lambda s: quota[s])
            quota[donor] -= 1
            quota[name] = 1
    return sorted(i for name in names for i in groups[name][:quota[name]])
