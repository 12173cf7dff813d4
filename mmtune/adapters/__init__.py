"""Adapter injection shared by every task: `apply_adapter(model, spec, ...)` on top of peft."""

from mmtune.adapters.inject import (AdapterReport, apply_adapter, lora_plus_scale, merge_adapter, optimizer_parameters,
                                   part_lookup, trainable_state_dict)
from mmtune.adapters.quantized import check_quantized_training, merged_copy
from mmtune.adapters.targets import DEFAULT_TARGETS

__all__ = ["AdapterReport", "apply_adapter", "check_quantized_training", "lora_plus_scale", "merge_adapter", "merged_copy",
           "optimizer_parameters", "part_lookup",
           "trainable_state_dict", "DEFAULT_TARGETS"]
