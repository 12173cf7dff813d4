"""Federated fine-tuning: simulated sites, what travels, aggregation, bad sites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_color_set, run_cli, write_config

flwr = pytest.importorskip("flwr")


def _fed_yaml(path: Path, **kwargs) -> Path:
    path.write_text(yaml.safe_dump({"federated": {"rounds": 3, "local_epochs": 1, **kwargs}}))
    return path


@pytest.fixture(scope="module")
def site_set(tmp_path_factory) -> Path:
    """Three colours, 24 images each, a `site` column dealing them to three sites."""
    import csv

    root = tmp_path_factory.mktemp("fedcolors")
    manifest = make_color_set(root, per_class=24)
    with manifest.open() as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        row["site"] = f"s{i % 3}"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0]])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _config(tmp_path, tiny_models, site_set, **model_args):
    return write_config(tmp_path / "task.yaml", tiny_models["vit"], site_set,
                        model_args={"model": {"name": str(tiny_models["vit"]), "pretrained": True},
                                    "adapter": {"method": "lora", "r": 4, "alpha": 8}, **model_args},
                        data_args={"group_column": None, "verify_images": False},
                        trainer={"max_epochs": 1})


def test_three_site_simulation_improves_and_sends_only_trainable_tensors(tmp_path, tiny_models, site_set):
    from mmtune.federated.cli import simulate

    seen: list[set] = []

    def spy(app, message, context):
        reply = app(message, context)
        if message.metadata.message_type == "train":
            seen.append(set(reply.content["arrays"].keys()))
        return reply

    config = _config(tmp_path, tiny_models, site_set)
    run_dir, report = simulate(str(config), str(_fed_yaml(tmp_path / "fed.yaml")), 3, "site",
                               runs_dir=str(tmp_path / "runs"), handler=spy)
    accuracy = [r["global_test"]["test/accuracy"] for r in report["rounds"]]
    print(accuracy)
    assert accuracy[-1] > accuracy[0]
    assert len(report["sites"]) == 3
    assert seen and all(keys == seen[0] for keys in seen)
    assert all("lora" in k or "head" in k or "temperature" in k or "decision" in k for k in seen[0]), seen[0]
    assert report["bytes_per_message"]["share"] < 0.5
    assert (run_dir / "rounds.csv").is_file() and (run_dir / "federated.json").is_file()
    ckpt = run_dir / "checkpoints" / "global.ckpt"
    assert ckpt.is_file()
    run_cli("test", "--config", run_dir / "task.yaml", "--ckpt_path", ckpt)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "federated" in metrics
