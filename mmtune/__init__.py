"""mmtune: fine-tune image classifiers, vision-language models, image-text aligners and LLMs with one tool.

The Python API is the objects the CLI builds from YAML: a task (LightningModule) and a data module.
"""

from mmtune.adapters import apply_adapter
from mmtune.data.classification import ImageClassificationData
from mmtune.data.pairs import ImageTextPairData
from mmtune.data.text_pairs import QueryDocData
from mmtune.data.transforms import AugmentSpec
from mmtune.errors import ConfigError, DataError, MMTuneError, ModelError
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec
from mmtune.tasks.alignment import ImageTextAlignmentTask
from mmtune.tasks.classification import ImageClassificationTask

__version__ = "0.1.0"

__all__ = [
    "AdapterSpec", "AugmentSpec", "ConfigError", "DataError", "ImageClassificationData", "ImageClassificationTask",
    "ImageTextAlignmentTask", "ImageTextPairData", "QueryDocData",
    "MMTuneError", "ModelError", "ModelSpec", "MonitorSpec", "OptimizerSpec", "apply_adapter",
]
