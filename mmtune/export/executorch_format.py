"""ExecuTorch (.pte) export: `torch.export` -> `to_edge_transform_and_lower` with the XNNPACK
partitioner (CPU kernels of phones and edge boxes); int8 through PT2E quantization with the
XNNPACKQuantizer (symmetric, per-channel weights), calibrated on validation images."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from mmtune.export.graph import refused_operator_error


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=1024)


def export_pte(module: nn.Module, example, path: Path,
               calibration: Optional[Iterable[torch.Tensor]] = None, dynamic_shapes=None) -> Path:
    """Writes `module` as an ExecuTorch program lowered to XNNPACK; with `calibration` batches, int8.

    Args:
        example: one example tensor, or a tuple of them (an embedding tower's inputs).
        dynamic_shapes: torch.export's dynamic shapes per input (default: the batch of the one input).

    Raises:
        ExportError: torch.export or the lowering refused the model.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = example if isinstance(example, tuple) else (example,)
    shapes = dynamic_shapes if dynamic_shapes is not None else ({0: _batch_dim()},)
    try:
        program = torch.export.export(module, example, dynamic_shapes=shapes)
        if calibration is not None:
            program = torch.export.export(_quantized(program.module(), calibration), example, dynamic_shapes=shapes)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    except Exception as err:  # noqa: BLE001 - every exporter failure becomes one clear error
        raise refused_operator_error("executorch", module, example, err) from err
    path.write_bytes(lowered.buffer)
    return path


def _quantized(graph_module: nn.Module, calibration: Iterable[torch.Tensor]) -> nn.Module:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph_module, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_pt2e(prepared)
