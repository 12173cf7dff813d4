"""ONNX export through torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`), batch dimension
dynamic, one input `pixels` and one output `logits`."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn

from mmtune.export.graph import refused_operator_error

INPUT, OUTPUT = "pixels", "logits"


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Writes `module` as a single ONNX file (weights inside) with a dynamic batch size.

    Raises:
        ExportError: the exporter refused the model (its message, and the module holding the operator).
    """
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            torch.onnx.export(module, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - every exporter failure becomes one clear error
        raise refused_operator_error("onnx", module, (example,), err) from err
    return path
