"""Image transforms from the model's data config, through timm's `create_transform`, so timm's
augmentation presets (`rand-m9-mstd0.5-inc1`, `augmix-m5-w4-d2`, `trivialaugment`, random erasing)
are available by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass
class AugmentSpec:
    """Training augmentation (evaluation always resizes and center-crops).

    Args:
        enabled: off trains on the evaluation transform.
        scale: RandomResizedCrop area range; timm's ImageNet default (0.08, 1) can crop small
            defects out, so the default here is milder.
        ratio: RandomResizedCrop aspect-ratio range.
        hflip: horizontal flip probability (set 0 for images with a meaningful left/right, e.g. X-rays).
        vflip: vertical flip probability.
        color_jitter: brightness/contrast/saturation jitter strength, or None.
        auto_augment: a timm policy string, e.g. `rand-m9-mstd0.5-inc1`, `trivialaugment`.
        re_prob: random-erasing probability.
    """

    enabled: bool = True
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: Optional[float] = None
    auto_augment: Optional[str] = None
    re_prob: float = 0.0


def build_transform(data_config: dict, train: bool, augment: AugmentSpec, image_size: Optional[int] = None) -> Callable:
    """PIL image -> normalized tensor, for training (augmented) or evaluation."""
    from timm.data import create_transform

    c, h, w = data_config["input_size"]
    input_size = (c, image_size, image_size) if image_size else (c, h, w)
    common = dict(
        input_size=input_size,
        interpolation=data_config.get("interpolation", "bilinear"),
        mean=data_config["mean"],
        std=data_config["std"],
    )
    if train and augment.enabled:
        return create_transform(
            is_training=True, scale=tuple(augment.scale), ratio=tuple(augment.ratio), hflip=augment.hflip,
            vflip=augment.vflip, color_jitter=augment.color_jitter, auto_augment=augment.auto_augment,
            re_prob=augment.re_prob, **common,
        )
    # When the size is overridden the images are resized whole (no crop border is lost).
    crop_pct = 1.0 if image_size else data_config.get("crop_pct", 0.875)
    return create_transform(is_training=False, crop_pct=crop_pct, crop_mode=data_config.get("crop_mode", "center"), **common)


def decode_side(data_config: dict, train: bool, augment: AugmentSpec, image_size: Optional[int] = None) -> int:
    """The smallest image side the transform can use without upsampling what it keeps: training crops
    (RandomResizedCrop) can take as little as sqrt(scale_min * ratio) of a side before resizing to the
    input size; evaluation resizes the shorter side to size / crop_pct. A decoder may shrink a larger
    image down to this (`images.load_image(at_least=...)`)."""
    import math

    _, h, w = data_config["input_size"]
    size = image_size or max(h, w)
    if train and augment.enabled:
        smallest = math.sqrt(min(augment.scale) * min(min(augment.ratio), 1.0 / max(augment.ratio)))
        return math.ceil(size / max(smallest, 1e-3))
    crop_pct = 1.0 if image_size else data_config.get("crop_pct", 0.875)
    return math.ceil(size / crop_pct)
