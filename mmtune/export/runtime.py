"""Runs an exported file in its own runtime: onnxruntime for `.onnx`, the ExecuTorch runtime for `.pte`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from mmtune.errors import ExportError

SUFFIXES = (".onnx", ".pte")


class ExportedModel:
    """An exported classifier: `run(pixels [N, C, H, W] float32) -> logits [N, K]`.

    Attributes:
        input_size: the (C, H, W) the file takes, where the file fixes them (None for a dynamic size).
    """

    def __init__(self, path: Path, threads: Optional[int] = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"exported model not found: {self.path}")
        if self.path.suffix == ".onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            try:
                self._session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            except Exception as err:  # noqa: BLE001 - a corrupt or foreign file
                raise ExportError(f"onnxruntime cannot load {self.path}: {err}") from None
            first = self._session.get_inputs()[0]
            self._input = first.name
            dims = first.shape[1:]
            self.input_size = tuple(dims) if all(isinstance(d, int) for d in dims) else None
        elif self.path.suffix == ".pte":
            from executorch.runtime import Runtime

            try:
                self._method = Runtime.get().load_program(self.path).load_method("forward")
            except Exception as err:  # noqa: BLE001
                raise ExportError(f"the ExecuTorch runtime cannot load {self.path}: {err}") from None
            meta = self._method.metadata
            sizes = tuple(meta.input_tensor_meta(0).sizes()) if meta.num_inputs() else ()
            # a dynamic batch is planned up to the bound torch.export settled on (the first size here)
            self._max_batch = int(sizes[0]) if sizes else 1
            self.input_size = tuple(int(d) for d in sizes[1:]) if sizes else None
        else:
            raise ExportError(f"{self.path}: not an exported model (expected one of {', '.join(SUFFIXES)})")

    def run(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        if self.path.suffix == ".onnx":
            return self._session.run(None, {self._input: pixels})[0]
        import torch

        step = max(1, self._max_batch)
        return np.concatenate([self._method.execute((torch.from_numpy(pixels[i:i + step]),))[0].numpy()
                               for i in range(0, len(pixels), step)])
