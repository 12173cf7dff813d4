"""What an export starts from: the trained task, its run directory, and the data it was trained and
evaluated with (rebuilt from the run's `config.yaml`, so the sidecar records the image size the model
was trained at, not the size its base weights were published with)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from mmtune.errors import ExportError


@dataclass
class ExportSource:
    """A loaded checkpoint and what is known about its training.

    Attributes:
        task: the rebuilt task (a LightningModule).
        kind: the task's registry name (`image_classification`, ...).
        ckpt_path: the checkpoint file.
        run_dir: the run directory holding it, when the checkpoint sits in `<run>/checkpoints/`.
        data_args: the data module's arguments from the run's `config.yaml` (empty if unknown).
        data: the data module, set up and connected to the task, when its data can be read.
        notes: what could not be found (written into the export report).
    """

    task: object
    kind: str
    ckpt_path: Path
    run_dir: Optional[Path]
    data_args: dict = field(default_factory=dict)
    data: object = None
    notes: list[str] = field(default_factory=list)

    def split(self, name: str) -> list:
        """The samples of a split (`val`, `test`), or [] when the data is not available."""
        if self.data is None:
            return []
        return list(self.data.splits.get(name) or [])


def _run_dir_of(ckpt: Path) -> Optional[Path]:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _fit_config(run_dir: Optional[Path]) -> dict:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return {}
    return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}


def load_source(ckpt_path: str, trust_remote_code: bool = False, data_path: Optional[str] = None,
                image_size: Optional[int] = None) -> ExportSource:
    """Loads the checkpoint's task and, for image classifiers and image-text / text-embedding models,
    the data module of its run.

    Args:
        ckpt_path: an mmtune checkpoint.
        trust_remote_code: passed to `load_task`.
        data_path: a folder or manifest to verify and calibrate on instead of the run's data.
        image_size: the size the model was trained at, when the run's config is not beside the checkpoint.
    """
    from mmtune.tasks.common import load_task, read_checkpoint

    ckpt = Path(ckpt_path)
    task = load_task(ckpt_path, trust_remote_code=trust_remote_code)
    kind = str(read_checkpoint(ckpt_path).get("mmtune_task"))
    run_dir = _run_dir_of(ckpt)
    config = _fit_config(run_dir)
    data_args = dict(((config.get("data") or {}).get("init_args")) or {})
    source = ExportSource(task, kind, ckpt, run_dir if config else None, data_args)
    if not config:
        source.notes.append(f"no config.yaml beside {ckpt} (not in <run>/checkpoints/): training data settings unknown")
    if image_size is not None:
        source.data_args["image_size"] = image_size
    if data_path is not None:
        source.data_args.update(path=data_path, val_path=None, test_path=None)
    if kind == "image_classification":
        source.data = _classification_data(task, source)
    elif kind == "image_text_alignment":
        source.data = _pair_data(task, source, ((config.get("data") or {}).get("class_path")))
    return source


def _pair_data(task, source: ExportSource, class_path: Optional[str]):
    """The run's pair data module (ImageTextPairData or QueryDocData, from its config or, with only
    --data, the one the model's family reads) set up and connected to the task's preprocessing."""
    import inspect

    import mmtune
    from mmtune.data.pairs import ImageTextPairData
    from mmtune.data.text_pairs import QueryDocData
    from mmtune.errors import DataError

    if not source.data_args.get("path"):
        source.notes.append("no training data known (pass --data): verification runs on random inputs")
        return None
    name = (class_path or "").rsplit(".", 1)[-1]
    default = QueryDocData if task.family_name == "sentence_transformers" else ImageTextPairData
    cls = getattr(mmtune, name, None) if name else default
    if cls not in (ImageTextPairData, QueryDocData):
        cls = default
    names = set(inspect.signature(cls.__init__).parameters) - {"self"}
    args = {k: v for k, v in source.data_args.items() if k in names}
    args["num_workers"] = 0
    try:
        dm = cls(**args)
        dm.setup("fit")
    except DataError as err:
        raise ExportError(f"cannot read the data to verify the export on ({args.get('path')}): {err}") from None
    dm.connect(task.preprocess)
    return dm


def _classification_data(task, source: ExportSource):
    """The run's ImageClassificationData with its splits read and connected to the task's classes, or
    None (with a note) when there is no data to read."""
    from mmtune.data.classification import ImageClassificationData
    from mmtune.errors import DataError

    args = {k: v for k, v in source.data_args.items() if k in _data_arg_names()}
    if not args.get("path"):
        source.notes.append("no training data known (pass --data): verification runs on random inputs")
        return None
    args["num_workers"] = 0
    args.pop("augment", None)  # evaluation transforms only
    try:
        dm = ImageClassificationData(**args)
        dm.setup("fit")
    except DataError as err:
        raise ExportError(f"cannot read the data to verify the export on ({args.get('path')}): {err}") from None
    dm.connect(task.classes, bool(task.hparams.multi_label), task.data_config)
    return dm


def _data_arg_names() -> set[str]:
    import inspect

    from mmtune.data.classification import ImageClassificationData

    return set(inspect.signature(ImageClassificationData.__init__).parameters) - {"self"}
