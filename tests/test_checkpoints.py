"""Adapter checkpoints, merged export, resume after a kill, and checkpoints of another model."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import only_version, run_cli, write_config
from support.killer import fit_process, with_callback
from mmtune import AdapterSpec, ImageClassificationData, ImageClassificationTask, ModelSpec, MonitorSpec



def _fit(tmp_path, model: ModelSpec, adapter: AdapterSpec, data: Path, epochs=2) -> tuple[ImageClassificationTask, L.Trainer]:
    task = ImageClassificationTask(model=model, adapter=adapter, monitor=MonitorSpec(early_stopping=False))
    dm = ImageClassificationData(path=str(data), batch_size=8, num_workers=0)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, dm)
    return task, trainer


def _last(trainer: L.Trainer) -> str:
    """Path of last.ckpt (written by mmtune's LastCheckpoint callback)."""
    return str(Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt")


def _batch(n=6):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_adapter_checkpoint_is_small_and_reloads_equal(tmp_path, tiny_models, color_set, method):
    task, trainer = _fit(tmp_path, ModelSpec(name=str(tiny_models["vit"])), AdapterSpec(method=method, r=4), color_set)
    ckpt_path = _last(trainer)
    ckpt = torch.load(ckpt_path, weights_only=False)
    calibration = ("temperature", "decision_thresholds")  # the task's own state, fitted on validation
    saved = sum(t.numel() for k, t in ckpt["state_dict"].items() if k not in calibration)
    assert ckpt["mmtune_weights"] == "trainable"
    assert saved == task.adapter_report.trainable  # the tiny ViT has no buffers: exactly the trainable tensors
    assert all(k in ckpt["state_dict"] for k in calibration)
    assert saved < 0.2 * task.adapter_report.total
    reloaded = ImageClassificationTask.load_from_checkpoint(ckpt_path)
    x = _batch()
    with torch.no_grad():
        assert torch.allclose(task.eval()(x), reloaded.eval()(x), atol=1e-4)
    assert reloaded.classes == ["blue", "green", "red"]


def test_cnn_checkpoint_keeps_batchnorm_statistics(tmp_path, tiny_models, color_set):
    task, trainer = _fit(tmp_path, ModelSpec(name=str(tiny_models["cnn"])), AdapterSpec(method="lora", r=2), color_set)
    ckpt = torch.load(_last(trainer), weights_only=False)
    assert any(k.endswith("running_mean") for k in ckpt["state_dict"])
    assert not any(k.endswith("conv1.base_layer.weight") for k in ckpt["state_dict"])
    reloaded = ImageClassificationTask.load_from_checkpoint(_last(trainer))
    with torch.no_grad():
        assert torch.allclose(task.eval()(_batch()), reloaded.eval()(_batch()), atol=1e-4)


def test_export_merges_into_native_timm_format(tmp_path, tiny_models, color_set):
    import timm

    task, trainer = _fit(tmp_path, ModelSpec(name=str(tiny_models["vit"])), AdapterSpec(method="lora", r=4), color_set)
    out = tmp_path / "exported"
    run_cli("export", "--ckpt_path", _last(trainer), "--out", out)
    trained = ImageClassificationTask.load_from_checkpoint(_last(trainer)).eval()
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # no mmtune, no peft
    with torch.no_grad():
        expected = trained(_batch())
        assert torch.allclose(plain(_batch()), expected, atol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == ["blue", "green", "red"] and config["num_classes"] == 3
    # the export is a backbone mmtune can start from again
    again = ImageClassificationTask(model=ModelSpec(name=str(out)), classes=["blue", "green", "red"])
    again.configure_model()
    with torch.no_grad():
        assert torch.allclose(again.eval()(_batch()), expected, atol=1e-4)


def test_torchvision_full_checkpoint_and_export(tmp_path, color_set):
    model = ModelSpec(name="tv:resnet18", pretrained=False)  # random base: checkpoints must hold everything
    task, trainer = _fit(tmp_path, model, AdapterSpec(method="lora", r=2), color_set, epochs=1)
    ckpt = torch.load(_last(trainer), weights_only=False)
    assert "mmtune_weights" not in ckpt
    reloaded = ImageClassificationTask.load_from_checkpoint(_last(trainer)).eval()
    out = reloaded.export(str(tmp_path / "tv_export"))
    from_export = ImageClassificationTask(model=ModelSpec(name=str(out)), classes=reloaded.classes)
    from_export.configure_model()
    with torch.no_grad():
        assert torch.allclose(from_export.eval()(_batch()), reloaded(_batch()), atol=1e-4)


def test_checkpoint_of_another_architecture_is_refused(tmp_path, tiny_models, color_set, capsys):
    runs = tmp_path / "runs"
    vit_cfg = write_config(tmp_path / "vit.yaml", tiny_models["vit"], color_set,
                           model_args={"adapter": {"method": "lora"}}, trainer={"max_epochs": 1})
    run_cli("fit", "--config", vit_cfg, "--runs_dir", runs)
    cnn_cfg = write_config(tmp_path / "cnn.yaml", tiny_models["cnn"], color_set, model_args={"adapter": {"method": "lora"}})
    with pytest.raises(SystemExit) as exit_info:
        run_cli("test", "--config", cnn_cfg, "--runs_dir", runs, "--ckpt_path",
                only_version(runs, "vit") / "checkpoints" / "best.ckpt")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the checkpoint does not fit this model" in err and "Traceback" not in err


def test_resume_after_kill_reaches_the_same_metrics(tmp_path, tiny_models, color_set):
    runs = tmp_path / "runs"
    common = dict(model_args={"adapter": {"method": "lora", "r": 4}}, data_args={"augment": {"color_jitter": 0.2}},
                  trainer={"max_epochs": 4})
    straight = write_config(tmp_path / "straight.yaml", tiny_models["vit"], color_set, **common)
    run_cli("fit", "--config", straight, "--runs_dir", runs)
    expected = json.loads((only_version(runs, "straight") / "metrics.json").read_text())["fit"]

    resumable = write_config(tmp_path / "resumable.yaml", tiny_models["vit"], color_set, **common)
    killing = with_callback(resumable, tmp_path / "killing.yaml", "support.killer.KillAtEpoch", epoch=2)
    killed = fit_process(runs, "resumable", "--config", killing)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run = only_version(runs, "resumable")
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "metrics.json").exists()

    resumed = fit_process(runs, "resumable", "--config", resumable, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert only_version(runs, "resumable") == run  # resumed in place
    got = json.loads((run / "metrics.json").read_text())["fit"]
    assert got["global_step"] == expected["global_step"]
    for key in ("val/loss", "val/accuracy", "train/loss"):
        assert got["metrics"][key] == pytest.approx(expected["metrics"][key], rel=1e-5, abs=1e-6), key
