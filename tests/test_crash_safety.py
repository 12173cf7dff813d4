"""Crash-safe writes (issue 11, item 3): a kill or a full disk during a save leaves the previous
checkpoint, metrics.json or export whole, and says which file could not be written."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import only_version, run_cli, write_config
from mmtune.files import WriteError, update_json

TESTS = Path(__file__).parent


def _config(tmp_path, tiny_models, color_set, name, epochs=2):
    return write_config(tmp_path / f"{name}.yaml", tiny_models["vit"], color_set,
                        model_args={"adapter": {"method": "lora", "r": 4}}, trainer={"max_epochs": epochs})


def _stray_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def test_kill_during_a_checkpoint_write_keeps_the_previous_one_and_resume_works(tmp_path, tiny_models, color_set):
    runs = tmp_path / "runs"
    cfg = _config(tmp_path, tiny_models, color_set, "killed")
    killing = yaml.safe_load(cfg.read_text())
    killing["trainer"]["callbacks"] = [{"class_path": "support.killer.KillDuringSave",
                                        "init_args": {"name": "last.ckpt", "nth": 2}}]
    (tmp_path / "killing.yaml").write_text(yaml.safe_dump(killing))
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    base = [sys.executable, "-m", "mmtune", "fit", "--runs_dir", str(runs), "--run_name", "killed"]
    killed = subprocess.run(base + ["--config", str(tmp_path / "killing.yaml")], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]  # died halfway through epoch 1's last.ckpt

    run = only_version(runs, "killed")
    previous = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)  # whole and loadable
    assert previous["epoch"] == 0
    resumed = subprocess.run(base + ["--config", str(cfg), "--ckpt_path", "last"], env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["epoch"] == 1 and final["global_step"] == 2 * previous["global_step"]
    assert json.loads((run / "metrics.json").read_text())["fit"]["epochs"] == 2


def _fail_on_nth_save(monkeypatch, n: int, name: str = "last.ckpt") -> None:
    """torch.save writes part of the file, then the disk is full, on the n-th write of `name`."""
    real_save, seen = torch.save, []

    def save(obj, f, *args, **kwargs):
        if name in str(getattr(f, "name", f)):
            seen.append(f)
            if len(seen) == n:
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_during_a_checkpoint_save_is_one_clear_line_and_keeps_the_previous(
        tmp_path, tiny_models, color_set, capsys, monkeypatch):
    runs = tmp_path / "runs"
    _fail_on_nth_save(monkeypatch, 2)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", _config(tmp_path, tiny_models, color_set, "full"), "--runs_dir", runs)
    assert exit_info.value.code == 2
    run = only_version(runs, "full")
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmtune: error:")]
    assert "no space left on the device while writing" in line and str(run / "checkpoints" / "last.ckpt") in line
    assert "the previous file is kept" in line
    monkeypatch.undo()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not _stray_temporaries(run)
    summary = json.loads((run / "metrics.json").read_text())["fit"]
    assert summary["interrupted"] and "no space left" in summary["error"]


def test_full_disk_while_updating_metrics_json_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "run" / "metrics.json"
    update_json(path, "fit", {"metrics": {"val/loss": 0.5}})
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match=f"no space left on the device while writing {path}"):
        update_json(path, "test", {"metrics": {"test/accuracy": 1.0}})
    assert path.read_bytes() == before
    assert not _stray_temporaries(tmp_path)


def test_interrupted_export_keeps_the_previous_export(tmp_path, tiny_models, color_set, capsys, monkeypatch):
    import safetensors.torch

    runs = tmp_path / "runs"
    run_cli("fit", "--config", _config(tmp_path, tiny_models, color_set, "exp", epochs=1), "--runs_dir", runs)
    ckpt = only_version(runs, "exp") / "checkpoints" / "last.ckpt"
    out = tmp_path / "exports" / "model"
    run_cli("export", "--ckpt_path", ckpt, "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "mmtune.json", "README.md"} <= set(before)

    real_save_file = safetensors.torch.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("export", "--ckpt_path", ckpt, "--out", out)
    assert exit_info.value.code == 2
    assert f"no space left on the device while writing {out}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no half export beside it

    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    run_cli("export", "--ckpt_path", ckpt, "--out", out)  # and a later export replaces it whole
    assert {p.name for p in out.iterdir()} == set(before)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]
