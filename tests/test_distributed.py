"""Two CPU processes (gloo) with the DDP preset: one run directory, rank-0 files, synchronized metrics."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import only_version, write_config

ROOT = Path(__file__).parent.parent
DDP_PRESET = ROOT / "configs" / "trainer" / "ddp.yaml"


def _mmtune(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "mmtune", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_models, color_set):
    cfg = write_config(tmp_path / "ddp.yaml", tiny_models["vit"], color_set,
                       model_args={"adapter": {"method": "lora", "r": 4}}, trainer={"max_epochs": 2})
    cpu2 = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
            "--runs_dir", tmp_path / "runs", "--run_name", "ddp"]
    _mmtune("fit", "--config", DDP_PRESET, "--config", cfg, *cpu2, cwd=tmp_path)
    run = only_version(tmp_path / "runs", "ddp")  # rank 1 made no run directory of its own
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    fit = json.loads((run / "metrics.json").read_text())["fit"]
    assert fit["global_step"] > 0

    _mmtune("test", "--config", DDP_PRESET, "--config", cfg, *cpu2, "--ckpt_path", "best", cwd=tmp_path)
    ddp_test = json.loads((run / "metrics.json").read_text())["test"]["metrics"]
    one = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--runs_dir", tmp_path / "runs", "--run_name", "ddp"]
    _mmtune("test", "--config", cfg, *one, "--ckpt_path", "best", cwd=tmp_path)
    single_test = json.loads((run / "metrics.json").read_text())["test"]["metrics"]
    # each process saw half of the test set; synchronized metrics equal the one-process metrics
    for key in ("test/accuracy", "test/f1_macro", "test/auroc_macro", "test/loss", "test/sensitivity/red"):
        assert ddp_test[key] == pytest.approx(single_test[key], abs=1e-5), key

    _mmtune("predict", "--config", DDP_PRESET, "--config", cfg, *cpu2, "--ckpt_path", "best",
            "--data.predict_path", color_set, cwd=tmp_path)
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert len(rows) == 48 and len({r["path"] for r in rows}) == 48  # every image once, from both ranks
    assert not list(tmp_path.glob("**/predictions*.rank*"))


@pytest.mark.slow
def test_fsdp2_two_cpu_processes(tmp_path, tiny_models, color_set):
    cfg = write_config(tmp_path / "fsdp2.yaml", tiny_models["vit"], color_set,
                       model_args={"adapter": {"method": "lora", "r": 4}}, trainer={"max_epochs": 2})
    fit = _mmtune("fit", "--config", ROOT / "configs" / "trainer" / "fsdp2.yaml", "--config", cfg,
                  "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
                  "--runs_dir", tmp_path / "runs", "--run_name", "fsdp2", cwd=tmp_path)
    assert "blocks and the root sharded over 2 processes" in fit.stdout + fit.stderr
    run = only_version(tmp_path / "runs", "fsdp2")
    # the gathered checkpoint is an ordinary trainable-only file that loads on one process
    _mmtune("test", "--config", cfg, "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--runs_dir", tmp_path / "runs", "--run_name", "fsdp2", "--ckpt_path", "best", cwd=tmp_path)
    test = json.loads((run / "metrics.json").read_text())["test"]["metrics"]
    assert test["test/accuracy"] > 0.5
