"""What travels: a task's trainable tensors as a Flower ArrayRecord, and the checks the server makes
on what comes back."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from mmtune.adapters import trainable_state_dict
from mmtune.errors import ModelError

if TYPE_CHECKING:  # flwr is imported where records are made, so sites and continual runs need no flwr
    from flwr.app import ArrayRecord


def trainable_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a site sends: the same selection as mmtune's trainable-only checkpoints (trainable
    parameters and persistent buffers), detached on the CPU. Floating tensors travel as float32
    (numpy, which Flower's arrays are, has no bfloat16)."""
    state = trainable_state_dict(module, module.state_dict())
    return {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in state.items()}


def to_record(tensors: dict[str, torch.Tensor]) -> "ArrayRecord":
    from flwr.app import ArrayRecord

    return ArrayRecord({k: v for k, v in tensors.items()})


def from_record(record: "ArrayRecord") -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


ADAPTER_ONLY = (".lora_", "lora_magnitude_vector")  # peft tensors a model without the adapter lacks


def full_model_bytes(module: nn.Module) -> int:
    """Bytes a full fine-tuning run would send per message: every tensor of the model (float32),
    without the adapter's own tensors, which a fully fine-tuned model does not have."""
    return sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for k, v in module.state_dict().items()
               if not any(part in k for part in ADAPTER_ONLY))


def load_tensors(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copies received tensors into `module` after checking they are exactly its trainable tensors.

    Raises:
        ModelError: keys or shapes differ (another adapter, head or model), naming `source`.
    """
    problem = mismatch(trainable_state_dict(module, module.state_dict()), tensors)
    if problem:
        raise ModelError(f"{source}: the received weights do not fit this model: {problem}")
    own = module.state_dict()
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))


def mismatch(expected: dict, received: dict) -> Optional[str]:
    """A one-line description of how `received` (name -> tensor/array) differs from `expected` in
    keys or shapes, or None when it fits."""
    missing = sorted(set(expected) - set(received))
    unknown = sorted(set(received) - set(expected))
    wrong = sorted(k for k in set(expected) & set(received) if tuple(expected[k].shape) != tuple(received[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
    if unknown:
        parts.append(f"{len(unknown)} unknown tensor(s) (e.g. {unknown[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(received[k].shape)} vs {tuple(expected[k].shape)})")
    return "; ".join(parts) or None
