#!/usr/bin/env python
"""CPU inference of one classifier in every runtime mmtune exports to, with accuracy beside each.

For each model (the demo's EfficientNet-Lite0 on the synthetic defects, and a ViT): torch eager,
torch.compile, ONNX fp32, ONNX int8 (static QDQ, calibrated on validation) and ExecuTorch (XNNPACK),
all through the exporters of `mmtune.export`, timed in one run on the same preprocessed test images:
images/s at batch 1 and 32, batch-1 latency p50/p90/p99, and test accuracy.

The classifiers are linear probes: the head is fitted on frozen pre-logit features (seconds on CPU), since
a LoRA fit of the demo takes tens of minutes on two cores; EfficientNet-Lite0 has real ImageNet weights
(tools/convert_efficientnet_lite.py), the ViT (vit_tiny, no weights offline) is random, so its accuracy only
shows that int8 keeps what fp32 has. `--quick` runs tiny timm test models on a few images, without torch.compile (a smoke test).

Usage::

    python tools/bench_export.py [--quick] [--json OUT.json] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TOOLS = Path(__file__).parent
sys.path.insert(0, str(TOOLS.parent))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data(root: Path, per_class: int, size: int) -> dict[str, list]:
    from mmtune.data.readers import read_image_labels
    from mmtune.data.splits import assign_splits

    _tool("make_defect_data").main(["--out", str(root), "--per-class", str(per_class), "--size", str(size), "--lots", "20"])
    samples = read_image_labels(str(root / "manifest.csv"))
    names = assign_splits(len(samples), [0.6, 0.2, 0.2], 0, [s.group for s in samples])
    return {split: [s for s, n in zip(samples, names) if n == split] for split in ("train", "val", "test")}


def _tensors(samples, transform, classes) -> tuple[torch.Tensor, torch.Tensor]:
    from mmtune.data.images import load_image

    x = torch.stack([transform(load_image(s.path)) for s in samples])
    return x, torch.tensor([classes.index(s.labels[0]) for s in samples])


def _linear_probe(model, x: torch.Tensor, y: torch.Tensor, classes: int, steps: int) -> None:
    model.reset_classifier(classes)
    with torch.no_grad():
        feats = torch.cat([model.forward_head(model.forward_features(b), pre_logits=True) for b in x.split(32)])
    head = model.get_classifier()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()


def _time(fn, x1: np.ndarray, x32: np.ndarray, iters1: int, iters32: int) -> dict:
    for _ in range(3):
        fn(x1)
    fn(x32)
    lat = []
    for _ in range(iters1):
        t = time.perf_counter()
        fn(x1)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(iters32):
        fn(x32)
    per32 = (time.perf_counter() - t) / iters32
    ms = np.asarray(lat) * 1000
    return {"b1_images_per_s": round(float(1000 / ms.mean()), 1), "b32_images_per_s": round(32 / per32, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p90_ms": round(float(np.percentile(ms, 90)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def _bench_model(label: str, model, data: dict, size: int, tmp: Path, quick: bool) -> dict:
    from mmtune.data.transforms import AugmentSpec, build_transform
    from mmtune.export.executorch_format import export_pte
    from mmtune.export.graph import example_batch
    from mmtune.export.onnx_format import INPUT, export_onnx
    from mmtune.export.quantize import quantize_onnx_static
    from mmtune.export.runtime import ExportedModel
    from mmtune.models.vision import _plain

    import timm

    classes = sorted({s.labels[0] for s in data["train"]})
    transform = build_transform(_plain(timm.data.resolve_model_data_config(model)), False, AugmentSpec(), size)
    xs = {split: _tensors(rows, transform, classes) for split, rows in data.items()}
    model.eval()
    _linear_probe(model, *xs["train"], len(classes), 50 if quick else 300)
    model.eval()
    x_test, y_test = xs["test"][0].numpy(), xs["test"][1].numpy()
    x1, x32 = x_test[:1], np.resize(x_test, (32, *x_test.shape[1:])).astype(np.float32)
    example = example_batch([3, size, size])
    onnx32 = export_onnx(model, example, tmp / f"{label}.onnx")
    val = [b.numpy() for b in xs["val"][0].split(32)]
    onnx8 = quantize_onnx_static(onnx32, tmp / f"{label}.int8.onnx", val, INPUT)
    pte = export_pte(model, example, tmp / f"{label}.pte")

    def eager(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    compiled_model = torch.compile(model, dynamic=False)  # compiled lazily; --quick leaves it out (minutes)

    def compiled(x):
        with torch.no_grad():
            return compiled_model(torch.from_numpy(x)).numpy()

    runtimes = {"torch eager": eager, **({} if quick else {"torch.compile": compiled}), "ONNX fp32": ExportedModel(onnx32).run,
                "ONNX int8": ExportedModel(onnx8).run, "ExecuTorch fp32": ExportedModel(pte).run}
    sizes = {"ONNX fp32": onnx32.stat().st_size, "ONNX int8": onnx8.stat().st_size, "ExecuTorch fp32": pte.stat().st_size}
    rows = {}
    for name, fn in runtimes.items():
        logits = np.concatenate([fn(x_test[i:i + 32]) if len(x_test[i:i + 32]) == 32 or name != "torch.compile"
                                 else eager(x_test[i:i + 32]) for i in range(0, len(x_test), 32)])
        row = _time(fn, x1, x32, 20 if quick else 200, 3 if quick else 20)
        row["accuracy"] = round(float((logits.argmax(1) == y_test).mean()), 4)
        row["file_mb"] = round(sizes[name] / 1e6, 2) if name in sizes else None
        rows[name] = row
        print(f"{label:>16} {name:>16}: {row}", flush=True)
    return {"test_images": len(y_test), "image_size": size, "runtimes": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny test models on a few images (smoke test)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads, the same for every runtime "
                        "(default 1: like for like on a small or shared machine; more: a probe checks the free cores first)")
    args = parser.parse_args(argv)
    import timm

    torch.manual_seed(0)
    sys.path.insert(0, str(TOOLS))
    from fair_threads import apply_threads

    warning = apply_threads(args.threads)
    results = {"threads": args.threads, "torch": torch.__version__, "models": {}, "thread_warning": warning}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.quick:
            size, data = 32, _data(root / "defects", 10, 32)
            models = {"test_efficientnet": timm.create_model("test_efficientnet"),
                      "test_vit": timm.create_model("test_vit", img_size=32, dynamic_img_size=False)}
        else:
            size, data = 128, _data(root / "defects", 100, 128)
            lite = root / "efficientnet_lite0"
            _tool("convert_efficientnet_lite").main(["--out", str(lite), "--no-verify"])
            models = {"efficientnet_lite0": timm.create_model(f"local-dir:{lite}", pretrained=True),
                      "vit_tiny": timm.create_model("vit_tiny_patch16_224", img_size=128)}
        for label, model in models.items():
            results["models"][label] = _bench_model(label, model, data, size, root, args.quick)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
