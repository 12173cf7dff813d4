"""`mmtune export --format onnx` of an image-text or text-embedding checkpoint: each tower its own
ONNX file (int8: static QDQ for the image tower, dynamic for the text tower), run in onnxruntime
(or, for `.pte` towers, the ExecuTorch runtime) against the trained towers on the validation pairs, with the largest embedding difference, the
cosine between exported and trained embeddings, and retrieval Recall@1 of both in the report."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mmtune.errors import ExportError
from mmtune.export.towers import (IMAGE, IMAGE_INPUTS, OUTPUTS, PTE_MAX_BATCH, TEXT, TEXT_INPUTS, dynamic_shapes,
                                  image_example, text_example, tower_networks)

INPUTS = {IMAGE: IMAGE_INPUTS, TEXT: TEXT_INPUTS}
# a pair data batch's keys -> (query tower, its feed keys, document feed keys, key names, direction names)
PAIR_LAYOUTS = {
    "pixels": (IMAGE, {"pixels": "pixels"}, ("image_key", "text_key"), ("i2t", "t2i")),
    "query_input_ids": (TEXT, {"input_ids": "query_input_ids", "attention_mask": "query_attention_mask"},
                        ("query_key", "text_key"), ("q2d", "d2q")),
}


@dataclass
class EmbeddingAgreement:
    """Exported against trained embeddings of one tower (both L2-normalised)."""

    items: int
    max_abs_diff: float
    mean_abs_diff: float
    min_cosine: float
    mean_cosine: float


class OnnxTower:
    """An exported tower in onnxruntime: `run(feed) -> embeddings`, feed keyed by input name."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: np.ascontiguousarray(feed[k]) for k in self.inputs})[0]


class PteTower:
    """An exported tower in the ExecuTorch runtime: `run(feed) -> embeddings`, in chunks of the batch
    size the program was planned for."""

    def __init__(self, path: Path, inputs: tuple[str, ...]) -> None:
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(path).load_method("forward")
        self.inputs = inputs
        self.max_batch = int(self.method.metadata.input_tensor_meta(0).sizes()[0])

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        rows = len(feed[self.inputs[0]])
        return np.concatenate([
            self.method.execute(tuple(torch.from_numpy(np.ascontiguousarray(feed[k][i:i + self.max_batch]))
                                      for k in self.inputs))[0].numpy()
            for i in range(0, rows, self.max_batch)])


def _pair_batches(source, limit: int) -> list[dict]:
    """Validation pairs as numpy feeds: per batch the query side (images or query texts), the
    documents (texts) and the item keys that retrieval scores with."""
    if source.data is None or not source.split("val"):
        return []
    out, seen = [], 0
    for batch in source.data.val_dataloader():
        layout = PAIR_LAYOUTS["pixels" if "pixels" in batch else "query_input_ids"]
        tower, feed_keys, key_names, directions = layout
        dtype = np.float32 if tower == IMAGE else np.int64
        out.append({"query_tower": tower, "directions": directions,
                    "query": {name: batch[key].numpy().astype(dtype) for name, key in feed_keys.items()},
                    "document": {k: batch[k].numpy().astype(np.int64) for k in TEXT_INPUTS},
                    "keys": tuple(batch[k] for k in key_names)})
        seen += len(batch["text_key"])
        if seen >= limit:
            break
    return out


def _noise_batches(task, towers: dict) -> list[dict]:
    """Without data: random pixels and a few fixed texts, so the files are still compared."""
    feeds = {TEXT: {k: v.numpy() for k, v in zip(TEXT_INPUTS, text_example(task))}}
    if IMAGE in towers:
        feeds[IMAGE] = {"pixels": image_example(task.preprocess.image_config["input_size"], 8).numpy()}
    return [{"query_tower": name, "query": feed, "document": None} for name, feed in feeds.items()]


def _agreement(pairs: list[tuple[np.ndarray, np.ndarray]]) -> EmbeddingAgreement:
    a = np.concatenate([p[0] for p in pairs]).astype(np.float64)
    b = np.concatenate([p[1] for p in pairs]).astype(np.float64)
    diff = np.abs(a - b)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return EmbeddingAgreement(len(a), float(diff.max()), float(diff.mean()), float(cosine.min()), float(cosine.mean()))


def _recall(batches: list[dict], side: str) -> dict:
    """Recall@1 both ways over the validation pairs, from the `side` (trained or exported) embeddings."""
    from mmtune.metrics.retrieval import pair_retrieval_metrics

    queries = torch.from_numpy(np.concatenate([b[side][0] for b in batches]))
    documents = torch.from_numpy(np.concatenate([b[side][1] for b in batches]))
    keys = tuple(torch.cat([b["keys"][i] for b in batches]) for i in range(2))
    names = batches[0]["directions"]
    values = pair_retrieval_metrics(queries.float(), documents.float(), keys, ks=(1,), names=names)
    return {f"{n}_r@1": values[f"{n}_r@1"] for n in names}


def _write_tower(name: str, tower, task, path: Path, quantize: Optional[str], calibration: list[np.ndarray]) -> dict:
    from mmtune.export.onnx_format import export_onnx
    from mmtune.export.quantize import quantize_onnx_dynamic, quantize_onnx_static

    example = (image_example(task.preprocess.image_config["input_size"]),) if name == IMAGE else text_example(task)
    sizes = {}
    if path.suffix == ".pte":
        from mmtune.export.executorch_format import export_pte

        export_pte(tower, example, path, dynamic_shapes=dynamic_shapes(name, task, PTE_MAX_BATCH))
        return {"fp32_bytes": path.stat().st_size}
    shapes = dynamic_shapes(name, task)
    if quantize:
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(tower, example, Path(tmp) / f"{name}.fp32.onnx", INPUTS[name], OUTPUTS, shapes)
            sizes["fp32_bytes"] = fp32.stat().st_size
            if name == IMAGE:
                quantize_onnx_static(fp32, path, calibration, "pixels", symbolic_shapes=False)
            else:
                quantize_onnx_dynamic(fp32, path)
    else:
        export_onnx(tower, example, path, INPUTS[name], OUTPUTS, shapes)
    sizes[f"{quantize or 'fp32'}_bytes"] = path.stat().st_size
    return sizes


def export_towers(source, out: Path, opts, quantize: Optional[str]) -> dict:
    """Writes `image_encoder.onnx` (image-text models) and `text_encoder.onnx` into `out`, verifies
    them on the validation pairs and returns the report's entries (files, sizes, verification, recall).

    Raises:
        ExportError: the exporter refused a tower, int8 has too few validation pairs to calibrate and
            score on, or an exported tower's embeddings differ beyond the tolerance.
    """
    from mmtune.export.quantize import check_calibration

    if quantize and opts.format == "executorch":
        raise ExportError("--quantize int8 of image-text and text-embedding towers is ONNX only (onnxruntime's "
                          "dynamic and static quantization); export them to executorch in float")
    task = source.task
    towers = tower_networks(task)
    batches = _pair_batches(source, opts.max_images)
    if quantize and IMAGE in towers:  # static QDQ of the image tower calibrates on validation images
        count = sum(len(b["keys"][0]) for b in batches)
        check_calibration(count, f"the validation pairs of {source.data_args.get('path') or 'the run'}")
    elif quantize and not batches:
        raise ExportError("--quantize int8 of a text encoder is scored by retrieval recall on validation pairs, and "
                          "none are known: export from <run>/checkpoints/ or pass --data with a pair manifest")
    if not batches:
        batches = _noise_batches(task, towers)
    calibration = [b["query"]["pixels"] for b in batches if b["query_tower"] == IMAGE]
    started = time.perf_counter()
    files, sizes = {}, {}
    suffix = ".pte" if opts.format == "executorch" else ".onnx"
    for name, tower in towers.items():
        path = out / f"{name}{suffix}"
        sizes[name] = _write_tower(name, tower, task, path, quantize, calibration)
        files[name] = path.name
    seconds = time.perf_counter() - started
    exported = {name: PteTower(out / file, INPUTS[name]) if suffix == ".pte" else OnnxTower(out / file)
                for name, file in files.items()}

    def trained(name: str, feed: dict) -> np.ndarray:
        with torch.no_grad():
            return towers[name](*[torch.from_numpy(feed[k]) for k in INPUTS[name]]).numpy()

    compared: dict[str, list] = {name: [] for name in towers}
    for b in batches:
        sides = [(b["query_tower"], b["query"])] + ([(TEXT, b["document"])] if b["document"] is not None else [])
        embedded = [(name, trained(name, feed), exported[name].run(feed)) for name, feed in sides]
        for name, ours, theirs in embedded:
            compared[name].append((ours, theirs))
        if len(embedded) == 2:
            b["trained"] = (embedded[0][1], embedded[1][1])
            b["exported"] = (embedded[0][2], embedded[1][2])
    verification = {name: _agreement(pairs) for name, pairs in compared.items() if pairs}
    _check(verification, quantize, opts)
    have_pairs = all("trained" in b for b in batches)
    retrieval = ({"split": "val", "pairs": sum(len(b["keys"][0]) for b in batches),
                  "trained": _recall(batches, "trained"), "exported": _recall(batches, "exported")}
                 if have_pairs else None)
    split = "val" if have_pairs else "random inputs"
    return {"files": files, "file_bytes": sizes, "export_seconds": round(seconds, 2),
            "verification": {name: {"split": split, **asdict(v),
                                    "tolerance": opts.tolerance if not quantize else None,
                                    "required_mean_cosine": opts.min_cosine if quantize else None}
                             for name, v in verification.items()},
            "retrieval_recall": retrieval}


def _check(verification: dict[str, EmbeddingAgreement], quantize: Optional[str], opts) -> None:
    """Float: the largest embedding difference within --tolerance; int8: the mean cosine to the
    trained embeddings at least --min_cosine (int8 embeddings differ by design)."""
    for name, v in verification.items():
        if quantize and v.mean_cosine < opts.min_cosine:
            raise ExportError(f"{name}: int8 embeddings have mean cosine {v.mean_cosine:.4f} to the trained "
                              f"model's on {v.items} validation inputs, under --min_cosine {opts.min_cosine:g} "
                              "(export without --quantize)")
        if not quantize and v.max_abs_diff > opts.tolerance:
            raise ExportError(f"{name}: embeddings differ from the trained model's by up to {v.max_abs_diff:.3g} "
                              f"on {v.items} validation inputs (tolerance {opts.tolerance:g}, --tolerance)")
