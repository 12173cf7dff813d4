"""The native export (today's `task.export`: merged safetensors in the family's own layout) made to
carry the training preprocessing in the family's own config, so the family's standard loaders
preprocess as training did: timm's `pretrained_cfg` (read by `timm.data.resolve_data_config`) and the
`data_config` of mmtune's torchvision layout."""

from __future__ import annotations

import json
from pathlib import Path

TIMM_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def export_native(task, out: Path, preprocessing: dict | None) -> None:
    """Writes the task's native export into `out` and, for image classifiers, records `preprocessing`
    (from `training_preprocessing`) in its config.json."""
    task.export(str(out))
    config_file = out / "config.json"
    if preprocessing is None or not config_file.is_file():
        return
    config = json.loads(config_file.read_text())
    values = {k: preprocessing[k] for k in TIMM_KEYS}
    if "pretrained_cfg" in config:  # timm save_for_hf
        cfg = config["pretrained_cfg"]
        cfg.update(values)
        # test-time sizes of the base weights would make resolve_data_config(use_test_size=True) differ
        for key in ("test_input_size", "test_crop_pct"):
            cfg.pop(key, None)
    if config.get("mmtune_family") == "torchvision":
        config["data_config"] = {**config.get("data_config", {}), **values}
    config_file.write_text(json.dumps(config, indent=2))
