"""Adapters on a quantized base (QLoRA): the configuration check and the full-precision merge, shared by
the text and vision-language tasks."""

from __future__ import annotations

import copy
from typing import Callable

from torch import nn

from mmtune.adapters.inject import merge_adapter
from mmtune.errors import ConfigError
from mmtune.specs import AdapterSpec, ModelSpec


def check_quantized_training(model: ModelSpec, adapter: AdapterSpec) -> None:
    """Quantized weights cannot train: a quantized base needs adapters."""
    if model.quantization != "none" and adapter.method == "none":
        raise ConfigError("model.quantization needs an adapter (adapter.method: lora): quantized weights cannot train")
    if model.quantization != "none" and adapter.rewrites_base:
        raise ConfigError(f"adapter.init {adapter.init!r} rewrites the base weights, which a quantized base "
                          "(model.quantization) cannot hold; load the base unquantized (init: loftq is LoftQ's own "
                          "quantization-aware start)")


def merged_copy(net: nn.Module, quantized: bool, rebuild_adapted: Callable[[], nn.Module]) -> nn.Module:
    """The trained network with its adapters merged, for export; `net` itself is left as it is.

    On a quantized base the trained weights (adapters, and any part trained in full such as the
    embeddings or a projector) are loaded into `rebuild_adapted()`, the same model built unquantized
    and adapted the same way, and merged there: merging into 4-bit weights would round the update
    away, and serving engines want plain weights.
    """
    if not quantized:
        return merge_adapter(copy.deepcopy(net))
    fresh = rebuild_adapted()
    trained = {name: p.detach() for name, p in net.named_parameters() if p.requires_grad}
    result = fresh.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"the unquantized rebuild lacks trained weights: {result.unexpected_keys[:5]}")
    return merge_adapter(fresh)
