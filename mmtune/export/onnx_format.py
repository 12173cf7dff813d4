"""ONNX export through torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`), batch dimension
dynamic; a classifier has one input `pixels` and one output `logits`, an embedding tower
(`mmtune.export.towers`) names its own inputs and dynamic dimensions."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn

from mmtune.export.graph import refused_operator_error

INPUT, OUTPUT = "pixels", "logits"


def export_onnx(module: nn.Module, example, path: Path, input_names=(INPUT,), output_names=(OUTPUT,),
                dynamic_shapes=None) -> Path:
    """Writes `module` as a single ONNX file (weights inside) with a dynamic batch size.

    Args:
        example: one example tensor, or a tuple of them (one per input name).
        dynamic_shapes: torch.export's dynamic shapes per input (default: the first dimension of the one input).

    Raises:
        ExportError: the exporter refused the model (its message, and the module holding the operator).
    """
    example = example if isinstance(example, tuple) else (example,)
    if dynamic_shapes is None:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            torch.onnx.export(module, example, str(path), input_names=list(input_names),
                              output_names=list(output_names), dynamic_shapes=tuple(dynamic_shapes), dynamo=True,
                              external_data=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - every exporter failure becomes one clear error
        raise refused_operator_error("onnx", module, example, err) from err
    return path
