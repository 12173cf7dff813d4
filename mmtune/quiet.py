"""A quiet terminal: what Lightning and the Hugging Face libraries print that is not about the user's run
(advertising tips, device banners, warnings that mmtune's own defaults cause, library progress bars
for data and weight loading) is hidden unless `--verbose` (or MMTUNE_VERBOSE=1) is given.

Why filters and not a switch per message: these come from libraries (Lightning's `rank_zero_info`,
`warnings.warn`, `tqdm`) and there is no option that turns off only them; the filters name each
message, so a warning about the user's own data or config still shows. `mmtune`'s own lines
(`[mmtune] ...`) always show. Imports nothing heavy: it runs before Lightning is imported.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "MMTUNE_VERBOSE"

# warnings whose cause is mmtune's own call or default, not the user's run
NOISY_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own call into torch's pytree
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # mmtune's default 10
    r"The '\w+_dataloader' does not have many workers",  # num_workers is a config choice, said in the README
    r"Checkpoint directory .* exists and is not empty",  # a resume writes into its own run folder by design
    r".*`training_step` returned `None`",  # a skipped non-finite batch (faults.on_nonfinite: skip) is counted
    r"Experiment logs directory .* exists and is not empty",  # the run folder is mmtune's, made before the logger
    r"The `srun` command is available on your system but is not used",
    r"The dirpath has changed from .* won't be reloaded",  # a fit from another run's checkpoint is a new run
    r"Your `IterableDataset` has `__len__` defined",  # litdata's loader: it shards by worker, its length holds

)

# log records of libraries mmtune imports (peft pulls in bitsandbytes and torchao), said at import time
# and about the libraries' own optional parts: logger name -> message pattern
NOISY_LOGS = {
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
    "torch.utils._pytree": r".*is an Enum subclass and is now natively supported by torch.compile",
}

# Lightning info lines kept in the quiet mode
_KEPT_INFO = ("[mmtune]", "`Trainer.fit` stopped")

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                      "lightning.fabric.utilities.rank_zero", "lightning.fabric.utilities.seed",
                      "lightning.pytorch.utilities.seed", "lightning.pytorch.accelerators.cuda")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes", "on")


class _QuietFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or is_verbose():
            return True
        return str(record.getMessage()).startswith(_KEPT_INFO)


_FILTER = _QuietFilter()


class _PatternFilter(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return is_verbose() or not self.pattern.match(str(record.getMessage()))


def quiet_terminal() -> None:
    """Installs the filters (idempotent); with MMTUNE_VERBOSE set it changes nothing."""
    if is_verbose():
        return
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in _LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
    for name, pattern in NOISY_LOGS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _PatternFilter) for f in logger.filters):
            logger.addFilter(_PatternFilter(pattern))
    # Library progress bars (datasets' "Generating train split", hub downloads); read when the libraries
    # are imported, so set before. A user's own setting wins.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import sys

    if "datasets" in sys.modules:  # already imported in this process (tests, notebooks)
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub.utils" in sys.modules:
        sys.modules["huggingface_hub.utils"].disable_progress_bars()


def quiet_gguf_bar() -> None:
    """transformers' GGUF loader shows a "Converting and de-quantizing GGUF tensors" tqdm bar with no
    switch of its own (plain `tqdm.auto`); in the quiet mode its module's `tqdm` is replaced by a
    disabled one. Called just before a GGUF file is loaded."""
    if is_verbose():
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm

    if not isinstance(getattr(gguf_utils, "tqdm", None), functools.partial):
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
