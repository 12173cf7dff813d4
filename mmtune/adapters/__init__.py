"""Adapter injection shared by every task: `apply_adapter(model, spec, ...)` on top of peft."""

from mmtune.adapters.inject import AdapterReport, apply_adapter, merge_adapter, part_lookup, trainable_state_dict
from mmtune.adapters.targets import DEFAULT_TARGETS

__all__ = ["AdapterReport", "apply_adapter", "merge_adapter", "part_lookup", "trainable_state_dict", "DEFAULT_TARGETS"]
