"""A process of the two-process "every training row is used" test: the training sampler and loader
as the data modules build them, on a real gloo process group. Registers a bare `mmtune` package (like
`ddp_loss_worker`) so a child does not import Lightning, transformers and timm."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

if "mmtune" not in sys.modules:
    _pkg = types.ModuleType("mmtune")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[2] / "mmtune")]
    sys.modules["mmtune"] = _pkg

import torch


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        return key[1]  # (epoch, index) from the sampler


def run(rank: int, world: int, port: int, cases: list, out: str) -> None:
    from mmtune.data.samplers import EpochSampler, ResumableLoader

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seen = {}
        for n, batch_size in cases:
            sampler = EpochSampler.for_this_process(n, seed=3).no_single_item_batch(batch_size)
            loader = ResumableLoader(Rows(n), batch_size=batch_size, sampler=sampler)
            batches = [b.tolist() for b in loader]
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, batches)
            seen[f"{n}/{batch_size}"] = gathered
        if rank == 0:
            torch.save(seen, out)
    finally:
        torch.distributed.destroy_process_group()
