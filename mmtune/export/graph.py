"""The network an exporter traces (adapters merged, eval mode, float32) and, when an exporter fails,
the module that holds the operator it refused."""

from __future__ import annotations

import copy
import re
from typing import Optional

import torch
from torch import nn

from mmtune.errors import ExportError


def classifier_network(task) -> nn.Module:
    """The classifier with its adapters merged: pixels [N, C, H, W] -> logits [N, classes]."""
    from mmtune.adapters import merge_adapter

    return merge_adapter(copy.deepcopy(task.net)).eval().float()


def example_batch(input_size: list[int], batch: int = 2) -> torch.Tensor:
    """An example input for tracing; batch 2, since a batch of 1 lets torch.export specialize the
    batch dimension to a constant."""
    c, h, w = input_size
    return torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(0))


def refused_operator_error(fmt: str, module: nn.Module, example: tuple, err: Exception) -> ExportError:
    """An ExportError with the exporter's own message and the module(s) whose graph holds the operator
    it names (found in torch.export's graph: every node keeps the module stack it came from)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))  # the ONNX exporter colours its report
    if "Exception summary" in text:  # the ONNX exporter's report: its summary is the message
        text = text.split("Exception summary", 1)[1].lstrip(" #\n")
    message = " ".join(text.split())[:600]
    holder = _module_of_operator(module, example, str(err))
    where = f" (operator in module {holder})" if holder else ""
    return ExportError(f"cannot export to {fmt}: {message}{where}")


def _module_of_operator(module: nn.Module, example: tuple, text: str) -> Optional[str]:
    try:
        program = torch.export.export(module, example)
    except Exception:  # noqa: BLE001 - the exporter's own message is reported; this is only a hint
        return None
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        names = {target, target.rsplit(".", 1)[0] if target.count(".") > 1 else target}
        names |= {n.replace(".", "::", 1) for n in list(names)}
        if any(re.search(re.escape(n) + r"\b", text) for n in names if len(n) > 3):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, cls = list(stack.values())[-1]
                cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                return f"{path or '<root>'} ({cls_name.rsplit('.', 1)[-1]})"
            return "<root>"
    return None
