"""A process of the two-process loss test.

Spawned children import this module; it registers a bare `mmtune` package so that importing the
loss module does not run `mmtune/__init__.py` (Lightning, transformers, timm: seconds per child).
"""

from __future__ import annotations

import math
import os
import sys
import types
from pathlib import Path

if "mmtune" not in sys.modules:
    _pkg = types.ModuleType("mmtune")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[2] / "mmtune")]
    sys.modules["mmtune"] = _pkg

import torch
import torch.nn.functional as F


def global_batch():
    """Eight pairs with duplicate captions across the two processes' halves, a projection, and hard
    negatives (one of them repeats a row's own caption, so it counts as a positive)."""
    g = torch.Generator().manual_seed(5)
    image, text = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    keys = (torch.arange(8), torch.tensor([0, 1, 2, 3, 0, 5, 6, 3]))
    negatives, negative_keys = text.roll(1, 0).clone(), torch.arange(20, 28)
    negatives[2], negative_keys[2] = text[2], 2
    return image, text, keys, torch.randn(6, 4, generator=g), negatives, negative_keys


def grads_of(*tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([(t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1) for t in tensors])


def run(rank: int, world: int, port: int, out: str) -> None:
    from mmtune.losses.contrastive import ClipLoss, SigLipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, cls in (("infonce", ClipLoss), ("sigmoid", SigLipLoss)):
            image, text, keys, proj, negatives, negative_keys = global_batch()
            n = image.shape[0] // world
            rows = slice(rank * n, (rank + 1) * n)
            proj = proj.clone().requires_grad_(True)
            scale = torch.tensor(math.log(10.0), requires_grad=True)
            bias = torch.tensor(-3.0, requires_grad=True)
            loss = sum(cls(rank=rank, world_size=world)(F.normalize(image[rows] @ proj, dim=-1),
                                                         F.normalize(text[rows] @ proj, dim=-1), scale,
                                                         keys=tuple(k[rows] for k in keys), logit_bias=bias,
                                                         negatives=F.normalize(negatives[rows] @ proj, dim=-1),
                                                         negative_keys=negative_keys[rows]).values())
            loss.backward()
            grads = grads_of(proj, scale, bias)
            total = loss.detach().clone()
            for t in (total, grads):  # what DDP does: average the losses (for logging) and the gradients
                torch.distributed.all_reduce(t)
                t /= world
            results[name] = (total, grads)
        if rank == 0:
            torch.save(results, out)
        torch.distributed.barrier()
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(1)
    # Leave without tearing down gloo or the interpreter: that teardown sometimes aborted a child
    # ("terminate called without an active exception") after the results were already written.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
