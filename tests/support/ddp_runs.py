"""`mmtune fit` with the DDP preset on 2 CPU processes against 1 process holding the same global batch:
the two runs must log the same losses and end with the same weights."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DDP_PRESET = Path(__file__).parent.parent.parent / "configs" / "trainer" / "ddp.yaml"


TESTS = Path(__file__).parent.parent


def fit_with_ddp_preset(config: Path, runs: Path, name: str, devices: int) -> Path:
    """Runs `mmtune fit` in a subprocess (Lightning starts the other process) and returns its run directory.
    The tests folder is on the path, so a config may name `support.*` callbacks and rewards."""
    done = subprocess.run([sys.executable, "-m", "mmtune", "fit", "--config", str(DDP_PRESET), "--config", str(config),
                           "--trainer.accelerator", "cpu", "--trainer.devices", str(devices),
                           "--trainer.precision", "32-true", "--runs_dir", str(runs), "--run_name", name],
                          cwd=runs.parent, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert done.returncode == 0, done.stderr[-4000:]
    versions = sorted((runs / name).glob("version_*"))
    assert len(versions) == 1, versions
    return versions[0]


def assert_same_training(ddp: Path, one: Path, steps: int) -> None:
    """Per-step `train/loss` (metrics.csv) and the last checkpoint's weights agree."""
    losses = [[float(r["train/loss"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/loss")]
              for run in (ddp, one)]
    assert len(losses[0]) == len(losses[1]) == steps, losses
    assert losses[0] == pytest.approx(losses[1], rel=1e-4), losses
    weights = [torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
               for run in (ddp, one)]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[1].items():
        assert torch.allclose(weights[0][key], value, atol=1e-4), key
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights[1].items())  # it did train
