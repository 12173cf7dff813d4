"""mmtune: fine-tune image classifiers, vision-language models, image-text aligners and LLMs with one tool.

The Python API is the objects the CLI builds from YAML: a task (LightningModule) and a data module.
"""

from mmtune.adapters import apply_adapter
from mmtune.data.classification import ImageClassificationData
from mmtune.data.pairs import ImageTextPairData
from mmtune.data.preference import PreferenceData
from mmtune.data.text import TextData, TextFields, TextSource
from mmtune.data.text_pairs import QueryDocData
from mmtune.data.transforms import AugmentSpec
from mmtune.data.vl_data import VisionTextData
from mmtune.data.vl_samples import VisualFields
from mmtune.errors import ConfigError, DataError, MMTuneError, ModelError
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec
from mmtune.tasks.alignment import ImageTextAlignmentTask
from mmtune.tasks.classification import ImageClassificationTask
from mmtune.tasks.dpo import DPOTask, PreferenceSpec
from mmtune.tasks.sft import CausalLMTask, GenerationSpec
from mmtune.tasks.vlm import DecodingSpec, VisionLanguageTask

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec", "AugmentSpec", "CausalLMTask", "ConfigError", "DPOTask", "DataError", "GenerationSpec",
    "ImageClassificationData", "ImageClassificationTask", "ImageTextAlignmentTask", "ImageTextPairData",
    "MMTuneError", "ModelError", "ModelSpec", "MonitorSpec", "OptimizerSpec", "PreferenceData", "PreferenceSpec",
    "QueryDocData", "TextData", "TextFields", "TextSource", "apply_adapter", "DecodingSpec", "VisionLanguageTask",
    "VisionTextData", "VisualFields",
]
