#!/usr/bin/env python
"""Federated LoRA against centralised training on the defects demo data.

The defects data (tools/make_defect_data.py) is split into 4 non-IID sites (seeded Dirichlet label
split); `mmtune federated` runs R rounds of FedAvg with LoRA; the same task, recipe and initial
weights then train on the pooled training rows for R x local_epochs epochs. Both are scored on the
same held-out test rows (the pooled manifest's test split). Also reported: bytes per message of the
LoRA run against the full model's (what full fine-tuning would send).

The backbone is a small timm ViT built from its config (no download), saved like a user's model.

    python tools/bench_federated.py [--quick] [--rounds 5] [--per-class 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _defects(out: Path, per_class: int, size: int) -> Path:
    spec = importlib.util.spec_from_file_location("make_defect_data", ROOT / "tools" / "make_defect_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.make_defect_dataset(str(out), per_class, size, 0, 12))


def _model(out: Path, size: int) -> Path:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size, patch_size=8, num_classes=4)
    timm.models.save_for_hf(model, str(out), safe_serialization=True)
    return out


def run(quick: bool, rounds: int, per_class: int, out: Path) -> dict:
    from mmtune.federated.arrays import to_record, trainable_tensors
    from mmtune.federated.cli import simulate
    from mmtune.federated.server import GlobalModel
    from mmtune.federated.site import Site

    size = 32
    manifest = _defects(out / "defects", per_class, size)
    model_dir = _model(out / "model", size)
    local_epochs = 1 if quick else 2
    config = {
        "model": {"class_path": "ImageClassificationTask", "init_args": {
            "model": {"name": str(model_dir)}, "adapter": {"method": "lora", "r": 8, "alpha": 16},
            "optimizer": {"lr": 3e-3, "warmup": 0.05}, "monitor": {"early_stopping": False}}},
        "data": {"class_path": "ImageClassificationData", "init_args": {
            "path": str(manifest), "group_column": "group", "batch_size": 16, "num_workers": 0,
            "verify_images": False}},
        "trainer": {"accelerator": "cpu", "max_epochs": 1},
    }
    config_path = out / "defects_lora.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    fed_path = out / "fed.yaml"
    fed_path.write_text(yaml.safe_dump({"federated": {"rounds": rounds, "local_epochs": local_epochs,
                                                      "simulation": {"alpha": 1.0, "seed": 0}}}))
    t0 = time.perf_counter()
    run_dir, report = simulate(str(config_path), str(fed_path), 4, "dirichlet", runs_dir=str(out / "runs"))
    fed_seconds = time.perf_counter() - t0
    federated_acc = report["rounds"][-1]["global_test"]["test/accuracy"]

    # centralised: the same task and initial tensors on the pooled training rows
    pooled = run_dir / "data" / "pooled.csv"
    task_config = yaml.safe_load((run_dir / "task.yaml").read_text())
    server = GlobalModel(task_config, out / "central", str(pooled))
    initial = trainable_tensors(server.task)
    central = Site("central", task_config, out / "central")
    central.describe(server.classes)
    t0 = time.perf_counter()
    fitted = central.fit_round(initial, rounds * local_epochs)
    central_seconds = time.perf_counter() - t0
    central_acc = server.test(to_record(fitted.tensors))["test/accuracy"]
    bytes_ = report["bytes_per_message"]
    result = {"rounds": rounds, "local_epochs": local_epochs, "sites": 4, "images": per_class * 4,
              "federated_test_accuracy": federated_acc, "centralised_test_accuracy": central_acc,
              "gap_points": 100 * (central_acc - federated_acc),
              "lora_bytes_per_message": bytes_["trainable"], "full_bytes_per_message": bytes_["full_model"],
              "lora_share_of_full": bytes_["share"], "federated_seconds": fed_seconds,
              "centralised_seconds": central_seconds, "run_dir": str(run_dir)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few images, 2 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--out", type=str, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args(argv)
    rounds, per_class = (2, 16) if args.quick else (args.rounds, args.per_class)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        result = run(args.quick, rounds, per_class, out)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
