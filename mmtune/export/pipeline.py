"""What `mmtune export` runs: load the checkpoint and its run's data, write the chosen format into a
staging folder, run the written file in its own runtime against the trained network, write the
sidecar and `export_report.json`, and move the folder into place only when every check held."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mmtune.errors import ConfigError, ExportError
from mmtune.export import FORMATS, REPORT
from mmtune.export import verify as checks
from mmtune.export.preprocessing import build_sidecar, training_preprocessing, write_sidecar

# task kind -> the formats its models can go to (an image classifier is one graph: pixels -> logits; an
# image-text or text-embedding model is one ONNX file per tower, `mmtune.export.tower_export`)
CAN_GO = {"image_classification": ("safetensors", "onnx", "executorch"),
          "image_text_alignment": ("safetensors", "onnx", "executorch")}
FILE_NAMES = {"onnx": "model.onnx", "executorch": "model.pte"}


@dataclass
class ExportOptions:
    """The options of `mmtune export` (see `mmtune export --help`)."""

    format: str = "safetensors"
    quantize: Optional[str] = None
    data: Optional[str] = None
    image_size: Optional[int] = None
    tolerance: float = checks.FP32_TOLERANCE
    min_agreement: float = checks.INT8_MIN_AGREEMENT
    min_cosine: float = checks.INT8_MIN_COSINE
    max_images: int = 256
    trust_remote_code: bool = False


def formats_of(kind: str) -> tuple[str, ...]:
    return CAN_GO.get(kind, ("safetensors",))


def _check_options(opts: ExportOptions) -> None:
    if opts.format not in FORMATS:
        raise ConfigError(f"--format {opts.format!r}: choose one of {', '.join(FORMATS)}")
    if opts.quantize not in (None, "none", "int8"):
        raise ConfigError(f"--quantize {opts.quantize!r}: the only quantization is int8")
    if opts.quantize == "int8" and opts.format == "safetensors":
        raise ConfigError("--quantize int8 needs --format onnx or executorch (safetensors stays float)")


def run_export(ckpt_path: str, out: Path, opts: ExportOptions) -> dict:
    """Exports a checkpoint into `out` and returns the export report.

    Raises:
        ExportError: the model cannot go to the format, the exporter refused it, calibration data is
            missing, or the exported file disagrees with the trained model beyond the tolerance.
    """
    from mmtune.evaluation.model_card import write_model_card
    from mmtune.export.native import export_native
    from mmtune.export.source import load_source
    from mmtune.files import atomic_folder

    _check_options(opts)
    quantize = opts.quantize if opts.quantize not in (None, "none") else None
    from mmtune.tasks.common import read_checkpoint

    kind = str(read_checkpoint(ckpt_path).get("mmtune_task"))  # checked before the model is built
    allowed = formats_of(kind)
    if opts.format not in allowed:
        raise ExportError(f"a {kind} model cannot be exported to {opts.format}; it can go to: {', '.join(allowed)}")
    source = load_source(ckpt_path, opts.trust_remote_code, opts.data, opts.image_size)
    task = source.task
    prep = _preprocessing(source)
    report: dict = {"checkpoint": str(ckpt_path), "task": source.kind, "format": opts.format, "quantize": quantize,
                    "notes": list(source.notes)}
    with atomic_folder(out) as staging:
        if opts.format == "safetensors":
            export_native(task, staging, prep)
            write_model_card(staging, source.run_dir, out.name)
        elif source.kind == "image_text_alignment":
            _export_towers(source, staging, opts, quantize, report)
        else:
            report.update(_export_graph(source, prep, staging / FILE_NAMES[opts.format], opts, quantize))
        if prep is not None:
            write_sidecar(staging, _sidecar(task, source.kind, prep, opts.format))
        (staging / REPORT).write_text(json.dumps(report, indent=2))
    return report


def _export_towers(source, staging: Path, opts: ExportOptions, quantize: Optional[str], report: dict) -> None:
    from mmtune.export.tower_export import export_towers
    from mmtune.export.towers import tower_sidecar, write_tokenizer

    report.update(export_towers(source, staging, opts, quantize))
    write_tokenizer(source.task, staging)
    write_sidecar(staging, tower_sidecar(source.task, report["files"], quantize))


def _preprocessing(source) -> Optional[dict]:
    if source.kind != "image_classification":
        return None
    args = source.data_args
    return training_preprocessing(source.task.data_config, args.get("image_size"), args.get("high_bit", "min_max"))


def _sidecar(task, kind: str, prep: dict, fmt: str) -> dict:
    decision = {**task.decision_rule(), "multi_label": bool(task.hparams.multi_label),
                "probabilities": "sigmoid(logits / temperature)" if task.hparams.multi_label
                else "softmax(logits / temperature)"}
    files = {"safetensors": "model.safetensors", **FILE_NAMES}
    return build_sidecar(kind, prep, task.classes, decision, ["pixels"], ["logits"],
                         {"model_file": files[fmt], "source_model": task.model_spec.name})


def _batches(source, split: str, limit: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Preprocessed pixels and targets of a split (through the data module's own evaluation loader)."""
    if not source.split(split):
        return [], []
    loader = source.data.val_dataloader() if split == "val" else source.data.test_dataloader()
    pixels, targets, seen = [], [], 0
    for batch in loader:
        pixels.append(batch["pixels"].numpy().astype(np.float32))
        target = batch["target"]
        targets.append((target.argmax(1) if target.ndim > 1 else target).numpy())
        seen += len(target)
        if seen >= limit:
            break
    return pixels, targets


def _export_graph(source, prep: dict, path: Path, opts: ExportOptions, quantize: Optional[str]) -> dict:
    from mmtune.export.executorch_format import export_pte
    from mmtune.export.graph import classifier_network, example_batch
    from mmtune.export.onnx_format import INPUT, export_onnx
    from mmtune.export.quantize import check_calibration, quantize_onnx_static
    from mmtune.export.runtime import ExportedModel

    net = classifier_network(source.task)
    val, _ = _batches(source, "val", opts.max_images)
    test, test_targets = _batches(source, "test", 10 ** 9)
    if quantize:
        check_calibration(sum(len(b) for b in val), f"the validation split of {source.data_args.get('path') or 'the run'}")
    if not val:  # no data known: the file is still compared with the trained network, on noise
        val = [example_batch(prep["input_size"], 8).numpy()]
    example = example_batch(prep["input_size"])
    started = time.perf_counter()
    sizes: dict = {}
    if opts.format == "onnx":
        if quantize:
            with tempfile.TemporaryDirectory() as tmp:
                fp32 = export_onnx(net, example, Path(tmp) / "model.fp32.onnx")
                sizes["fp32_bytes"] = fp32.stat().st_size
                quantize_onnx_static(fp32, path, val, INPUT)
        else:
            export_onnx(net, example, path)
    else:
        calibration = [torch.from_numpy(b) for b in val] if quantize else None
        if quantize:
            with tempfile.TemporaryDirectory() as tmp:
                sizes["fp32_bytes"] = export_pte(net, example, Path(tmp) / "model.fp32.pte").stat().st_size
        export_pte(net, example, path, calibration)
    sizes[f"{quantize or 'fp32'}_bytes"] = path.stat().st_size
    seconds = time.perf_counter() - started
    exported = ExportedModel(path)

    def reference(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()

    agreement = checks.compare(reference, exported.run, val)
    checks.check(agreement, bool(quantize), opts.tolerance, opts.min_agreement, path.name)
    acc = checks.accuracy(reference, exported.run, test, test_targets)
    return {"file": path.name, "file_bytes": sizes, "export_seconds": round(seconds, 2),
            "verification": {"split": "val" if source.split("val") else "random inputs", **checks.as_dict(agreement),
                             "tolerance": opts.tolerance if not quantize else None,
                             "min_agreement": opts.min_agreement if quantize else None},
            "test_accuracy": checks.as_dict(acc)}
