"""`mmtune predict --model exported/model.onnx` (or `.pte`): predictions from an exported file on a folder
or manifest, preprocessed from its sidecar alone, written in the CSV columns of the checkpoint's
`predict` (path, prediction, p_<class>...), so users check what they ship."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from mmtune.errors import ConfigError, ExportError


def check_input_size(model_size: Optional[tuple], prep: dict, model_file: Path) -> None:
    """Raises ExportError when the file takes another image size than the preprocessing gives."""
    want = tuple(prep["input_size"])
    if model_size is not None and tuple(model_size) != want:
        raise ExportError(f"{model_file} takes images of {'x'.join(map(str, model_size))} (C x H x W) but the data is "
                          f"preprocessed to {'x'.join(map(str, want))}; export at that size or drop --image_size")


def predict_exported(model_file: str, data: str, out: Optional[str] = None, batch_size: int = 32,
                     image_size: Optional[int] = None) -> Path:
    """Writes predictions.csv for every image of `data` (folder or manifest) with the exported model.

    Args:
        model_file: an `.onnx` or `.pte` file written by `mmtune export` (its sidecar beside it).
        data: an image folder or a CSV/JSONL manifest (labels not needed).
        out: the CSV to write (default: predictions.csv beside the model).
        batch_size: images per runtime call.
        image_size: preprocess at this square size instead of the sidecar's (must match the file).
    """
    from mmtune.data.images import load_image
    from mmtune.data.readers import read_image_labels
    from mmtune.export.preprocessing import preprocess, probabilities, read_sidecar
    from mmtune.export.runtime import ExportedModel
    from mmtune.tasks.classification import write_predictions

    path = Path(model_file)
    sidecar = read_sidecar(path)
    if sidecar.get("task") != "image_classification":
        raise ConfigError(f"{path}: mmtune predict --model runs image classifiers; this export is {sidecar.get('task')!r}")
    prep = dict(sidecar["preprocessing"])
    if image_size:
        c = prep["input_size"][0]
        prep.update(input_size=[c, image_size, image_size], resize_shorter_side=int(image_size / prep["crop_pct"]))
    model = ExportedModel(path)
    check_input_size(model.input_size, prep, path)
    samples = read_image_labels(data)
    post, classes = sidecar["postprocessing"], sidecar["classes"]
    rows: list[tuple[str, list[float]]] = []
    channels = prep["input_size"][0]
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pixels = np.stack([preprocess(load_image(s.path, channels, prep.get("high_bit", "min_max")), prep) for s in chunk])
        probs = probabilities(model.run(pixels), post)
        rows += [(s.path, p.tolist()) for s, p in zip(chunk, probs)]
    thresholds, positive = _decision(post, classes)
    target = Path(out) if out else path.parent / "predictions.csv"
    write_predictions(target, rows, classes, thresholds, positive)
    print(f"[mmtune] wrote {len(rows)} predictions to {target}")
    return target


def _decision(post: dict, classes: list[str]) -> tuple[Optional[list[float]], Optional[int]]:
    """The thresholds and positive class of the trained task's decision rule (`decision_rule`)."""
    given = post.get("thresholds") or {}
    positive = classes.index(post["positive_class"]) if post.get("positive_class") else None
    if post.get("multi_label") or positive is not None:
        return [float(given.get(c, 0.5)) for c in classes], positive
    return None, None
