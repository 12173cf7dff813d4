"""The preprocessing sidecar (`preprocessing.json`) and a preprocessor that needs only PIL and numpy.

The sidecar records what the model was trained and evaluated with: the data module's evaluation
transform (`mmtune.data.transforms.build_transform`: timm's eval transform at the run's `image_size`,
which resizes the whole image with crop_pct 1.0) on the image decoded by `mmtune.data.images.load_image`.
`preprocess` re-implements that chain by hand (torchvision's Resize/CenterCrop/ToTensor/Normalize on
a PIL image) because the point of the file is a deployment without torch, timm or mmtune; the tests
check it against mmtune's own transform.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

from mmtune.errors import ExportError

SIDECAR_VERSION = 1
PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def training_preprocessing(data_config: dict, image_size: Optional[int] = None, high_bit: str = "min_max") -> dict:
    """The evaluation preprocessing of a classifier trained with `data_config` (the backbone's) and the
    data module's `image_size` override, as plain values.

    Returns:
        input_size [C, H, W], resize (shorter side, before the center crop), crop_pct, crop_mode,
        interpolation, mean, std, channel order, grayscale handling, scale and layout.
    """
    c, h, w = (int(v) for v in data_config["input_size"])
    if image_size:
        h = w = int(image_size)
    crop_pct = 1.0 if image_size else float(data_config.get("crop_pct", 0.875))
    interpolation = str(data_config.get("interpolation", "bilinear"))
    if interpolation not in PIL_FILTERS:
        interpolation = "bilinear"  # timm maps unknown names to bilinear too
    mean, std = [float(x) for x in data_config["mean"]], [float(x) for x in data_config["std"]]
    return {
        "input_size": [c, h, w], "resize_shorter_side": math.floor(min(h, w) / crop_pct) if h == w else None,
        "resize": [math.floor(h / crop_pct), math.floor(w / crop_pct)], "crop_pct": crop_pct,
        "crop_mode": data_config.get("crop_mode", "center"), "interpolation": interpolation,
        "mean": mean[:c] if c < len(mean) else mean, "std": std[:c] if c < len(std) else std,
        "channel_order": "L" if c == 1 else "RGB", "layout": "NCHW", "dtype": "float32", "scale": 1.0 / 255.0,
        "grayscale": ("images are converted to one channel (PIL convert('L'))" if c == 1 else
                      "grayscale images are replicated to RGB (PIL convert('RGB')); RGBA is composited on white"),
        "high_bit": high_bit,
        "steps": ["decode to 8-bit (16-bit: min_max windows each image's own range)" if high_bit == "min_max"
                  else "decode to 8-bit (16-bit: divided by 65535)",
                  "resize the shorter side to resize_shorter_side (keep aspect; PIL filter `interpolation`)"
                  if h == w else "resize to `resize` (H, W)",
                  "center crop input_size[1:]", "x = pixels * scale", "x = (x - mean) / std per channel", "HWC -> CHW"],
    }


def build_sidecar(kind: str, preprocessing: Optional[dict], classes: Optional[list[str]], decision: dict,
                  inputs: list[str], outputs: list[str], extra: Optional[dict] = None) -> dict:
    """The whole sidecar: preprocessing, the class list, and how logits become decisions."""
    return {"mmtune_sidecar": SIDECAR_VERSION, "task": kind, "inputs": inputs, "outputs": outputs,
            "preprocessing": preprocessing, "classes": classes, "postprocessing": decision, **(extra or {})}


def write_sidecar(out_dir: Path, sidecar: dict) -> Path:
    from mmtune.export import SIDECAR

    path = Path(out_dir) / SIDECAR
    path.write_text(json.dumps(sidecar, indent=2))
    return path


def read_sidecar(model_file: Path) -> dict:
    """The sidecar beside an exported file.

    Raises:
        ExportError: there is none (the model's preprocessing is unknown).
    """
    from mmtune.export import SIDECAR

    path = Path(model_file).parent / SIDECAR
    if not path.is_file():
        raise ExportError(f"{model_file}: no {SIDECAR} beside it, so its preprocessing and classes are unknown "
                          "(export with `mmtune export --format onnx|executorch`)")
    return json.loads(path.read_text())


def preprocess(image, prep: dict) -> np.ndarray:
    """A decoded PIL image (already L or RGB, 8-bit) -> a [C, H, W] float32 array, as the model was fed."""
    from PIL import Image

    c, h, w = prep["input_size"]
    image = image.convert("L" if c == 1 else "RGB")
    resample = Image.Resampling(PIL_FILTERS[prep["interpolation"]])
    if prep.get("resize_shorter_side"):
        size = prep["resize_shorter_side"]
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)  # torchvision's _compute_resized_output_size
        new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    else:
        new_h, new_w = prep["resize"]
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample)
    top, left = int(round((new_h - h) / 2.0)), int(round((new_w - w) / 2.0))
    image = image.crop((left, top, left + w, top + h))
    x = np.asarray(image, dtype=np.float32) * np.float32(prep["scale"])
    x = x[:, :, None] if x.ndim == 2 else x
    x = (x - np.asarray(prep["mean"], np.float32)) / np.asarray(prep["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def probabilities(logits: np.ndarray, post: dict) -> np.ndarray:
    """softmax (or sigmoid, multi-label) of logits / temperature, as `predict` writes them."""
    z = logits.astype(np.float64) / float(post.get("temperature") or 1.0)
    if post.get("multi_label"):
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
