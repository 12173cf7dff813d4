"""int8 for ONNX files through onnxruntime's quantizer: static QDQ (activations calibrated on
validation images) for vision models and vision towers; dynamic (int8 weights, activations
quantized per batch at run time) for text encoders, whose token activations vary too much with the
text for static ranges, as onnxruntime's quantization guide advises for transformers. The calibration set is checked first: too few images give
activation ranges from noise."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from mmtune.errors import ExportError

MIN_CALIBRATION_IMAGES = 8


def check_calibration(count: int, source: str) -> None:
    """Raises ExportError when the calibration set is missing or smaller than MIN_CALIBRATION_IMAGES."""
    if count == 0:
        raise ExportError(f"--quantize int8 needs calibration images and {source} has none: give the run's data "
                          "(export from <run>/checkpoints/) or pass --data with a folder or manifest")
    if count < MIN_CALIBRATION_IMAGES:
        raise ExportError(f"--quantize int8: the calibration set ({source}) has {count} images; at least "
                          f"{MIN_CALIBRATION_IMAGES} are needed for activation ranges")


def quantize_onnx_static(fp32: Path, out: Path, batches: list[np.ndarray], input_name: str,
                         symbolic_shapes: bool = True) -> Path:
    """QDQ int8 (per-channel weights, int8 activations) calibrated on `batches`; `symbolic_shapes`
    False skips onnxruntime's symbolic shape pass, which fails on transformer towers (ViT attention)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict] = iter({input_name: b} for b in batches)

        def get_next(self):
            return next(self._it, None)

    prepared = out.with_name(out.stem + ".pre.onnx")
    # shape inference + graph cleanup, as onnxruntime advises
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=not symbolic_shapes)
    try:
        quantize_static(str(prepared), str(out), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    return out


def quantize_onnx_dynamic(fp32: Path, out: Path) -> Path:
    """Dynamic int8 (int8 weights of MatMul/Gemm and friends; activation ranges taken per batch)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.stem + ".pre.onnx")
    # ONNX's own shape inference only: onnxruntime's symbolic pass cannot resolve a transformer's dynamic
    # sequence length (and then writes a debug copy into the working directory)
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    return out
