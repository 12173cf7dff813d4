"""Numerical faults (a NaN loss stops the fit naming the step and the samples, or is skipped and counted)
and preemption (SIGTERM saves an exactly resumable last.ckpt and stops)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from conftest import only_version, run_cli, write_config
from mmtune import ImageClassificationData, ImageClassificationTask, ModelSpec, MonitorSpec
from mmtune.errors import TrainingError
from mmtune.faults import NonFiniteGuard
from support.faults import NanOutputAt, NanPixelsAt

TESTS = Path(__file__).parent


def _trainer(tmp_path, callbacks, epochs=1) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", default_root_dir=tmp_path, logger=False, callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False)


def _classifier(tiny_models, color_set):
    task = ImageClassificationTask(model=ModelSpec(name=str(tiny_models["vit"])), monitor=MonitorSpec(early_stopping=False))
    return task, ImageClassificationData(path=str(color_set), batch_size=8, num_workers=0, group_column="group")


def test_nan_loss_stops_the_fit_naming_step_and_samples_and_keeps_the_last_good_checkpoint(tmp_path, tiny_models,
                                                                                           color_set, capsys):
    runs, hits = tmp_path / "runs", tmp_path / "hits.json"
    cfg = write_config(tmp_path / "nan.yaml", tiny_models["vit"], color_set, model_args={"adapter": {"method": "lora"}},
                       trainer={"max_epochs": 3, "callbacks": [{"class_path": "support.faults.NanPixelsAt",
                                                                "init_args": {"steps": [6], "record": str(hits)}}]})
    with pytest.raises(SystemExit) as stopped:
        run_cli("fit", "--config", cfg, "--runs_dir", runs)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("mmtune: error:"))
    (hit,) = json.loads(hits.read_text())
    assert hit["global_step"] == 6 and len(hit["sample_id"]) == 8
    assert "non-finite loss at global step 6 (epoch 1, batch 1)" in line
    assert ", ".join(hit["sample_id"]) in line and hit["sample_id"][0].startswith(str(color_set))

    run = only_version(runs, "nan")
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5  # written at the end of epoch 0 (5 batches: the short last one trains), never after the broken step
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    ImageClassificationTask.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)
    fit = json.loads((run / "metrics.json").read_text())["fit"]
    assert fit["interrupted"] and "global step 6" in fit["error"] and fit["nonfinite_skipped"] == 0


class WatchStep(Callback):
    """Copies the trainable weights and the optimizer state before and after one global step."""

    def __init__(self, step: int) -> None:
        self.step, self.before, self.after = step, None, None

    def _copy(self, trainer, pl_module) -> dict:
        opt = trainer.optimizers[0].state_dict()
        return {"weights": {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad},
                "optimizer": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                              for k, s in opt["state"].items()}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.before = self._copy(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.before is not None and self.after is None:
            self.after = self._copy(trainer, pl_module)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_skip_leaves_weights_and_optimizer_state_untouched_and_counts_the_batch(tmp_path, tiny_models, color_set):
    task, dm = _classifier(tiny_models, color_set)
    watch_bad, watch_good = WatchStep(2), WatchStep(3)
    trainer = _trainer(tmp_path, [NonFiniteGuard("skip", 3), NanPixelsAt([2]), watch_bad, watch_good], epochs=2)
    trainer.fit(task, dm)
    assert _same(watch_bad.before["weights"], watch_bad.after["weights"])
    assert all(_same(watch_bad.before["optimizer"][k], watch_bad.after["optimizer"][k]) for k in watch_bad.before["optimizer"])
    assert watch_bad.before["optimizer"].keys() == watch_bad.after["optimizer"].keys()
    # the next, finite step does train (the check is not vacuous)
    assert not _same(watch_good.before["weights"], watch_good.after["weights"])
    assert all(torch.isfinite(p).all() for p in task.parameters())
    fit = json.loads((tmp_path / "metrics.json").read_text())["fit"]
    assert fit["nonfinite_skipped"] == 1 and fit["metrics"]["train/nonfinite_skipped"] == 1
    (skipped,) = fit["nonfinite_batches"]
    assert skipped["global_step"] == 2 and skipped["reason"] == "loss" and len(skipped["sample_ids"]) == 8


def test_skip_stops_once_more_than_max_nonfinite_batches_are_bad(tmp_path, tiny_models, color_set):
    task, dm = _classifier(tiny_models, color_set)
    with pytest.raises(TrainingError, match=r"global step 3 .*1 batches were skipped before \(faults.max_nonfinite: 1\)"):
        _trainer(tmp_path, [NonFiniteGuard("skip", 1), NanPixelsAt([1, 3])], epochs=2).fit(task, dm)


def test_nonfinite_gradient_is_caught_even_with_a_finite_loss(tmp_path, tiny_models, color_set):
    class NanGradient(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 1:
                next(p for p in pl_module.parameters() if p.grad is not None).grad[0] = float("inf")

    task, dm = _classifier(tiny_models, color_set)
    with pytest.raises(TrainingError, match=r"non-finite gradient \(.+\) at global step 1 \(epoch 0, batch 1\)"):
        _trainer(tmp_path, [NanGradient(), NonFiniteGuard()]).fit(task, dm)


def test_text_sft_error_names_the_file_lines_of_the_batch(tmp_path):
    from support.text import build_model, repeat_rows, write_jsonl
    from mmtune.data.text import TextData
    from mmtune.specs import AdapterSpec
    from mmtune.tasks.sft import CausalLMTask

    model = build_model("llama", tmp_path)
    train = write_jsonl(tmp_path / "train.jsonl", repeat_rows(16, seed=1))
    task = CausalLMTask(model=ModelSpec(name=str(model)), adapter=AdapterSpec(method="lora", r=4),
                        monitor=MonitorSpec(early_stopping=False))
    dm = TextData(path=str(train), val_path=str(train), batch_size=4, max_length=64)
    hits = tmp_path / "hits.json"
    with pytest.raises(TrainingError) as err:
        _trainer(tmp_path, [NanOutputAt(2, str(hits))]).fit(task, dm)
    (hit,) = json.loads(hits.read_text())
    assert len(hit["sample_id"]) == 4 and all(i.startswith(f"{train} line ") for i in hit["sample_id"])
    assert f"non-finite loss at global step 2 (epoch 0, batch 2); samples in the batch: {', '.join(hit['sample_id'])}" in str(err.value)


# ---- preemption -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("resume", ["ckpt_path", "slurm_requeue"])
def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_to_the_uninterrupted_result(tmp_path, tiny_models,
                                                                                       color_set, resume):
    runs = tmp_path / "runs"
    common = dict(model_args={"adapter": {"method": "lora", "r": 4}}, data_args={"augment": {"color_jitter": 0.2}},
                  trainer={"max_epochs": 3})
    straight = write_config(tmp_path / "straight.yaml", tiny_models["vit"], color_set, **common)
    run_cli("fit", "--config", straight, "--runs_dir", runs)
    expected = json.loads((only_version(runs, "straight") / "metrics.json").read_text())["fit"]

    resumable = write_config(tmp_path / "resumable.yaml", tiny_models["vit"], color_set, **common)
    signalled = yaml.safe_load(resumable.read_text())
    signalled["trainer"]["callbacks"] = [{"class_path": "support.faults.SigtermAt", "init_args": {"step": 5}}]
    (tmp_path / "signalled.yaml").write_text(yaml.safe_dump(signalled))
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    base = [sys.executable, "-m", "mmtune", "fit", "--runs_dir", str(runs), "--run_name", "resumable"]
    # timeout: a guard against a hang (the run that does not stop, as before), not a measurement
    stopped = subprocess.run(base + ["--config", str(tmp_path / "signalled.yaml")], env=env, capture_output=True,
                             text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    run = only_version(runs, "resumable")
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 6 and saved["epoch"] == 1  # the end of the very step it was told at, mid-epoch
    assert "[mmtune] SIGTERM: saved" in stopped.stdout and "batch 1 of 5" in stopped.stdout
    assert json.loads((run / "metrics.json").read_text())["fit"]["interrupted"]

    if resume == "ckpt_path":
        again = subprocess.run(base + ["--config", str(resumable), "--ckpt_path", "last"], env=env, capture_output=True,
                               text=True, timeout=300)
    else:  # SLURM starts the same command again after a requeue
        again = subprocess.run(base + ["--config", str(resumable)], env={**env, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"},
                               capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert only_version(runs, "resumable") == run  # resumed in place
    got = json.loads((run / "metrics.json").read_text())["fit"]
    assert got["global_step"] == expected["global_step"] == 15
    for key in ("val/loss", "val/accuracy", "train/loss"):
        assert got["metrics"][key] == pytest.approx(expected["metrics"][key], rel=1e-5, abs=1e-6), key
    weights = [torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
               for r in (run, only_version(runs, "straight"))]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[1]:
        assert torch.allclose(weights[0][key], weights[1][key], atol=1e-6), key
