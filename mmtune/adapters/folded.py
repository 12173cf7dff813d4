"""LoRA and VeRA folded into the base weights for a stretch of inference (GRPO's sampling), with the
trained weights put back exactly afterwards.

peft's `merge_adapter` / `unmerge_adapter` add and subtract the update in place: in bf16 the base
weights pick up rounding error at every step (a GRPO run merges once per step, thousands of times), and
the reference (the base with adapters off) drifts. Here each adapted layer gets a new weight tensor
`W + delta` for the duration and its original tensor back at the end, so nothing is rounded twice;
the price is one extra copy of the adapted weights while the context is open. peft has no such
out-of-place merge, hence the code.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

FOLDABLE = ("LORA", "VERA")


def _foldable_layers(net: nn.Module) -> list[nn.Module]:
    """The adapted layers, or [] when any of them cannot be folded exactly (a quantized or sharded
    base, DoRA's magnitude, a non-Linear base, prompt learning)."""
    configs = getattr(net, "peft_config", None)
    if not configs or any(str(getattr(c.peft_type, "value", c.peft_type)) not in FOLDABLE for c in configs.values()):
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        base = layer.get_base_layer()
        weight = getattr(base, "weight", None)
        plain = type(base) is nn.Linear and type(weight) is nn.Parameter and weight.is_floating_point()
        extras = any(getattr(layer, name, {}).get(a) for name in ("use_dora", "lora_bias") for a in layer.active_adapters)
        if not plain or extras or layer.merged or layer.disable_adapters:
            return []
    return layers


@contextmanager
def folded_adapters(net: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the context `net` computes with its adapters folded into its base weights (one matmul
    per layer instead of three); yields whether it folded (False: left as it is)."""
    layers = _foldable_layers(net) if enabled else []
    if not layers:
        yield False
        return
    originals: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                weight = base.weight
                own = getattr(layer, layer.adapter_layer_names[0])  # the adapters this layer holds
                delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters if a in own)
                originals.append((base, weight))
                base.weight = nn.Parameter((weight.float() + delta).to(weight.dtype), requires_grad=False)
        with net.disable_adapter():  # the layers now compute base_layer(x) only: the folded weights
            yield True
    finally:
        for base, weight in originals:
            base.weight = weight
