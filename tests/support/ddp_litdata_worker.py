"""A process of the two-process litdata test: `StreamingImageData`'s training loader on a real gloo
process group, each rank streaming its own part. Registers a bare `mmtune` package (like
`ddp_rows_worker`) so a child does not import Lightning and timm."""

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


def _size(img) -> torch.Tensor:  # stands in for the model's transform: the test needs the rows, not pixels
    return torch.tensor(img.size)


def run(rank: int, world: int, port: int, root: str, batch_size: int, out: str) -> None:
    from mmtune.data.formats_litdata import ItemDecoder, StreamingLoader, open_split

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dataset = open_split(root, "train", None, None, None, seed=3, shuffle=True)
        dataset.decoder = ItemDecoder(_size, ["blue", "green", "red"], False, 3, "min_max", "image", "label", "|", 3, False)
        loader = StreamingLoader(dataset, batch_size=batch_size)
        epochs = [[b["index"].tolist() for b in loader] for _ in range(2)]
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, {"epochs": epochs, "len": len(loader)})
        if rank == 0:
            torch.save(gathered, out)
    finally:
        torch.distributed.destroy_process_group()
