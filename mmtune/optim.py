"""AdamW parameter groups and warmup-then-decay schedules from an `OptimizerSpec`.

Shared by every task. Each trainable parameter gets a learning rate (the part's rate if
`part_lrs` names its part, times the layer-wise decay of its block) and a weight decay (none for
norms, biases, other 1-D tensors and names the model lists in `no_weight_decay()`); parameters with
equal settings share a group.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from mmtune.errors import ConfigError
from mmtune.specs import OptimizerSpec


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    spec: OptimizerSpec,
    layer_ids: Optional[dict[str, int]] = None,
    part_of: Optional[Callable[[str], str]] = None,
    part_names: Iterable[str] = (),
    no_decay: Iterable[str] = (),
    lr_scale: Optional[Callable[[str], float]] = None,
) -> list[dict]:
    """Groups trainable parameters by (lr, weight_decay).

    Args:
        named_params: (name, parameter) pairs; frozen ones are skipped.
        spec: the optimizer spec.
        layer_ids: parameter name -> block index, the head having the largest; needed for
            `spec.layer_decay`.
        part_of: parameter name -> part name; needed for `spec.part_lrs`.
        part_names: the model's part names, to reject typos in `spec.part_lrs`.
        no_decay: parameter names (or prefixes) never decayed, e.g. position embeddings.
        lr_scale: parameter name -> a multiplier of its rate, applied last (LoRA+'s B matrices:
            `mmtune.adapters.lora_plus_scale`).
    """
    part_lrs = spec.all_part_lrs()
    unknown = sorted(set(part_lrs) - set(part_names))
    if unknown:
        raise ConfigError(f"optimizer.part_lrs (or vision_lr/projector_lr) names unknown part(s) {unknown}; "
                          f"this model's parts are {sorted(part_names)}")
    if spec.layer_decay is not None and not layer_ids:
        raise ConfigError("optimizer.layer_decay is set but this model has no block structure to decay over")
    top = max(layer_ids.values()) if layer_ids else 0
    no_decay = tuple(no_decay)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lr = spec.lr
        if part_lrs and part_of is not None:
            lr = part_lrs.get(part_of(name), lr)
        if spec.layer_decay is not None:
            lr *= spec.layer_decay ** (top - layer_ids.get(name, top))
        if lr_scale is not None:
            lr *= lr_scale(name)
        decays = param.ndim > 1 and not name.endswith(".bias") and not any(
            name == n or name.startswith(n + ".") for n in no_decay
        )
        wd = spec.weight_decay if decays else 0.0
        group = groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd})
        group["params"].append(param)
    if not groups:
        raise ConfigError("no trainable parameters for the optimizer")
    return list(groups.values())


def build_optimizer(groups: list[dict], spec: OptimizerSpec) -> torch.optim.Optimizer:
    """AdamW over prepared groups; fused as `spec.fused` says (None: on CUDA when every parameter is there)."""
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused = spec.fused if spec.fused is not None else (on_cuda or None)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, fused=fused)


def lr_lambda(spec: OptimizerSpec, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's peak lr at a step: linear warmup, then the chosen decay."""
    total = max(int(total_steps), 1)
    warmup = int(spec.warmup * total) if spec.warmup < 1 else int(spec.warmup)
    warmup = min(warmup, total - 1) if total > 1 else 0
    floor = spec.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        if spec.schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, spec: OptimizerSpec, total_steps: int) -> dict:
    """A Lightning scheduler config stepping every optimizer step."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}
