"""mmtune: fine-tune image classifiers, vision-language models, image-text aligners and LLMs with one tool.

The Python API is the objects the CLI builds from YAML: a task (LightningModule) and a data module.

The names below are imported on first use (PEP 562 `__getattr__`), so `import mmtune` and
`mmtune --help` do not pay for torch, Lightning and transformers before anything needs them.
`from mmtune import ImageClassificationTask` works as before.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "apply_adapter": "mmtune.adapters",
    "ImageClassificationData": "mmtune.data.classification",
    "ImageTextPairData": "mmtune.data.pairs",
    "PreferenceData": "mmtune.data.preference",
    "PromptData": "mmtune.data.prompts",
    "TextData": "mmtune.data.text",
    "TextFields": "mmtune.data.text",
    "TextSource": "mmtune.data.text",
    "QueryDocData": "mmtune.data.text_pairs",
    "StreamingImageData": "mmtune.data.streaming_module",
    "AugmentSpec": "mmtune.data.transforms",
    "VisionTextData": "mmtune.data.vl_data",
    "VisionPreferenceData": "mmtune.data.vl_preference",
    "VisionPromptData": "mmtune.data.vl_prompts",
    "VisualFields": "mmtune.data.vl_samples",
    "ConfigError": "mmtune.errors",
    "DataError": "mmtune.errors",
    "MMTuneError": "mmtune.errors",
    "ModelError": "mmtune.errors",
    "AdapterSpec": "mmtune.specs",
    "ModelSpec": "mmtune.specs",
    "MonitorSpec": "mmtune.specs",
    "OptimizerSpec": "mmtune.specs",
    "ImageTextAlignmentTask": "mmtune.tasks.alignment",
    "ImageClassificationTask": "mmtune.tasks.classification",
    "DPOTask": "mmtune.tasks.dpo",
    "PreferenceSpec": "mmtune.losses.preference",
    "GRPOSpec": "mmtune.tasks.grpo",
    "GRPOTask": "mmtune.tasks.grpo",
    "RewardSpec": "mmtune.rewards",
    "RewardModelTask": "mmtune.tasks.reward_model",
    "CausalLMTask": "mmtune.tasks.sft",
    "GenerationSpec": "mmtune.tasks.sft",
    "DecodingSpec": "mmtune.tasks.vlm",
    "VisionLanguageTask": "mmtune.tasks.vlm",
    "VisionPreferenceTask": "mmtune.tasks.vlm_preference",
    "VisionGRPOTask": "mmtune.tasks.vlm_grpo",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mmtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


def import_public_api() -> None:
    """Imports every public task and data class, so that Lightning's short `class_path` names
    (`class_path: ImageClassificationTask`) resolve and every task is in the task registry."""
    for name in _PUBLIC:
        __getattr__(name)
