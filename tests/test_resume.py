"""Exact resume for every task: a fit killed with SIGKILL mid-epoch and resumed with `--ckpt_path last`
ends with the uninterrupted run's metrics (metrics.json and the last epoch's logged curves) and weights.

Each test runs the same config three times: straight through (in this process), with a callback that
SIGKILLs the process mid-epoch (a subprocess, as a kill takes the whole process), and resumed (in this
process). `monitor.save_last_every_n_steps` rewrites last.ckpt inside epochs, so most resumes start
mid-epoch: the test checks the step the checkpoint was saved at.
"""

from __future__ import annotations

import csv
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
from mmtune import MonitorSpec
from mmtune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

TESTS = Path(__file__).parent
DDP_PRESET = TESTS.parent / "configs" / "trainer" / "ddp.yaml"
QUIET = {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1}


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return {k: v for k, v in env.items() if not k.startswith("SLURM_")}


def _mmtune(args: list, expect: int) -> None:
    """`mmtune ARGS` in a subprocess; the timeout guards against a hang, it measures nothing."""
    done = subprocess.run([sys.executable, "-m", "mmtune", *map(str, args)], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == expect, done.stderr[-4000:]


def _with_killer(config: Path, out: Path, epoch: int, batch: int) -> Path:
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"] = [{"class_path": "support.killer.KillAtEpoch",
                                     "init_args": {"epoch": epoch, "batch": batch}}]
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _curves(run: Path, epochs: set[int]) -> dict[tuple[int, str], float]:
    """The values metrics.csv logged in `epochs`, by (step, name)."""
    out = {}
    for row in csv.DictReader((run / "metrics.csv").open()):
        if row.get("epoch") and int(float(row["epoch"])) in epochs:
            out.update({(int(row["step"]), k): float(v) for k, v in row.items() if v and k not in ("epoch", "step")})
    return out


def _trainable(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def assert_same_end(resumed: Path, straight: Path, last_epoch: int) -> None:
    """metrics.json's fit entry, the last epoch's curves in metrics.csv, and last.ckpt's weights agree."""
    got, want = (json.loads((r / "metrics.json").read_text())["fit"] for r in (resumed, straight))
    assert "interrupted" not in got and got["global_step"] == want["global_step"] and got["epochs"] == want["epochs"]
    assert got["metrics"].keys() == want["metrics"].keys()
    for key, value in want["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for key in ("best_score", "best_epoch", "best_step"):
        assert got.get(key) == pytest.approx(want.get(key), rel=1e-5, abs=1e-6), key
    curves = [_curves(r, {last_epoch}) for r in (resumed, straight)]
    assert curves[1] and curves[0].keys() == curves[1].keys()
    for key, value in curves[1].items():
        assert curves[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    weights = [_trainable(r) for r in (resumed, straight)]
    assert weights[0].keys() == weights[1].keys()
    for key, value in weights[1].items():
        assert torch.allclose(weights[0][key].float(), value.float(), atol=1e-6), key


def kill_and_resume(tmp_path: Path, config: Path, epoch: int, batch: int, saved_step: int, last_epoch: int,
                    extra: tuple = ()) -> Path:
    """Runs `config` straight, then killed at (epoch, batch) and resumed; checks the resume started from
    `saved_step` and ended where the straight run did. Returns the resumed run directory."""
    runs = tmp_path / "runs"
    run_cli("fit", "--config", config, "--runs_dir", runs, "--run_name", "straight", *extra)
    killing = _with_killer(config, tmp_path / "killing.yaml", epoch, batch)
    base = ["fit", "--runs_dir", runs, "--run_name", "resumed", *extra]
    _mmtune([*base, "--config", killing], expect=-9)
    run = only_version(runs, "resumed")
    assert not (run / "metrics.json").exists()
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == saved_step
    run_cli(*base, "--config", config, "--ckpt_path", "last")
    assert only_version(runs, "resumed") == run  # resumed in place
    assert_same_end(run, only_version(runs, "straight"), last_epoch)
    return run


# ---- SFT ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    from support.text import build_model

    return build_model("llama", tmp_path_factory.mktemp("resume_lm"))


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> dict[str, Path]:
    from support.text import repeat_rows, write_jsonl

    root = tmp_path_factory.mktemp("resume_text")
    return {"train": write_jsonl(root / "train.jsonl", repeat_rows(20, seed=1)),
            "extra": write_jsonl(root / "extra.jsonl", repeat_rows(10, seed=2)),
            "val": write_jsonl(root / "val.jsonl", repeat_rows(6, seed=3))}


def test_sft_unpacked_resumes_mid_epoch_exactly(tmp_path, llama, text_files):
    from support.text import sft_config

    # 20 rows + half of 10 (a seeded subset of the weighted source) = 25, batches of 4: 7 a step, 3 epochs
    data = {"path": str(text_files["train"]), "val_path": str(text_files["val"]), "batch_size": 4,
            "sources": [{"path": str(text_files["extra"]), "weight": 0.5}]}
    config = sft_config(tmp_path / "sft.yaml", llama, data, trainer={**QUIET, "max_epochs": 3},
                        model_args={"adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                                    "monitor": {"early_stopping": False, "save_last_every_n_steps": 3}})
    kill_and_resume(tmp_path, config, epoch=1, batch=4, saved_step=9, last_epoch=2)  # saved at epoch 1, batch 2


def test_sft_packed_with_gradient_accumulation_resumes_mid_epoch_exactly(tmp_path, llama, text_files):
    from support.text import sft_config

    # packed rows of 64 tokens, batches of 2, two batches a step
    data = {"path": str(text_files["train"]), "val_path": str(text_files["val"]), "batch_size": 1, "packing": True,
            "sources": [{"path": str(text_files["extra"]), "weight": 1.0}]}
    config = sft_config(tmp_path / "packed.yaml", llama, data,
                        trainer={**QUIET, "max_epochs": 3, "accumulate_grad_batches": 2},
                        model_args={"adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
                                    "monitor": {"early_stopping": False, "save_last_every_n_steps": 1}})
    kill_and_resume(tmp_path, config, epoch=1, batch=3, saved_step=9, last_epoch=2)


# ---- DPO ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    from support.text import build_model

    return build_model("qwen2", tmp_path_factory.mktemp("resume_dpo"))


def test_dpo_resumes_mid_epoch_exactly(tmp_path, qwen2):
    from support.text import write_jsonl
    from test_dpo import pairs

    train, val = write_jsonl(tmp_path / "train.jsonl", pairs(16, 0)), write_jsonl(tmp_path / "val.jsonl", pairs(4, 1))
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "DPOTask", "init_args": {
            "model": {"name": str(qwen2)}, "adapter": {"method": "lora", "r": 4, "dropout": 0.1},
            "optimizer": {"lr": 0.01, "warmup": 0.2}, "monitor": {"early_stopping": False, "save_last_every_n_steps": 2}}},
        "data": {"class_path": "PreferenceData", "init_args": {"path": str(train), "val_path": str(val),
                                                              "max_length": 64, "batch_size": 4}},
        "trainer": {**QUIET, "max_epochs": 3},
    }))
    kill_and_resume(tmp_path, config, epoch=1, batch=3, saved_step=6, last_epoch=2)  # 4 steps an epoch


@pytest.mark.slow
def test_kto_with_unpaired_rows_resumes_mid_epoch_exactly(tmp_path, qwen2):
    """KTO's batches hold mismatched rows built from the batch itself: the resumed batch must be rebuilt alike."""
    from support.text import write_jsonl
    from test_preference_losses import kto_rows

    train, val = write_jsonl(tmp_path / "train.jsonl", kto_rows(16, 0)), write_jsonl(tmp_path / "val.jsonl", kto_rows(4, 1))
    config = tmp_path / "kto.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "DPOTask", "init_args": {
            "model": {"name": str(qwen2)}, "adapter": {"method": "lora", "r": 4, "dropout": 0.1},
            "optimizer": {"lr": 0.01, "warmup": 0.2}, "preference": {"loss": "kto", "beta": 0.5},
            "monitor": {"early_stopping": False, "save_last_every_n_steps": 2}}},
        "data": {"class_path": "PreferenceData", "init_args": {"path": str(train), "val_path": str(val),
                                                              "max_length": 64, "batch_size": 4}},
        "trainer": {**QUIET, "max_epochs": 3},
    }))
    kill_and_resume(tmp_path, config, epoch=1, batch=3, saved_step=6, last_epoch=2)  # 4 steps an epoch


# ---- VLM ------------------------------------------------------------------------------------------------
def test_vlm_resumes_mid_epoch_exactly(tmp_path):
    from support.tiny_vlms import caption_rows, tiny_vlm_dir

    rows = caption_rows(16, tmp_path / "images")
    data = tmp_path / "captions.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "image": str(image), "text": text, "group": f"p{i % 8}",
                                        "split": "val" if i >= 12 else "train"}) + "\n"
                            for i, (image, text) in enumerate(rows)))
    config = tmp_path / "vlm.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "VisionLanguageTask", "init_args": {
            "model": {"name": str(tiny_vlm_dir("qwen2_vl", tmp_path / "vlms"))},
            "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            "optimizer": {"lr": 5e-3, "weight_decay": 0.0, "warmup": 0.2},
            # sampled generation for two validation rows: its RNG must not leak into training
            "decoding": {"max_new_tokens": 4, "do_sample": True, "val_samples": 2},
            "monitor": {"early_stopping": False, "save_last_every_n_steps": 2}}},
        "data": {"class_path": "VisionTextData", "init_args": {"path": str(data), "batch_size": 3, "num_workers": 0,
                                                              "prompt": "What is shown?"}},
        "trainer": {**QUIET, "max_epochs": 3},
    }))
    kill_and_resume(tmp_path, config, epoch=1, batch=3, saved_step=6, last_epoch=2)  # 4 steps an epoch


# ---- alignment --------------------------------------------------------------------------------------------
def test_clip_alignment_resumes_mid_epoch_exactly(tmp_path):
    from support.tiny_align import make_pair_set, save_tiny_clip

    pairs = make_pair_set(tmp_path / "pairs", per_kind=4)  # 32 pairs: 16 train, 8 val, 8 test
    config = tmp_path / "clip.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "ImageTextAlignmentTask", "init_args": {
            "model": {"name": str(save_tiny_clip(tmp_path / "clip"))},
            "adapter": {"method": "lora", "r": 4, "dropout": 0.1}, "learn_logit_scale": True,
            "optimizer": {"lr": 5e-3, "warmup": 0.2},
            "monitor": {"metric": "val/mean_recall", "mode": "max", "early_stopping": False,
                        "save_last_every_n_steps": 2}}},
        "data": {"class_path": "ImageTextPairData", "init_args": {
            "path": str(pairs), "batch_size": 4, "num_workers": 0, "group_column": "group", "label_column": "label",
            "split": [0.5, 0.25, 0.25]}},
        "trainer": {**QUIET, "max_epochs": 3},
    }))
    kill_and_resume(tmp_path, config, epoch=1, batch=3, saved_step=6, last_epoch=2)  # 4 steps an epoch


# ---- classification -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_classification_under_two_process_ddp_resumes_mid_epoch_exactly(tmp_path, tiny_models, color_set):
    ddp = ("--config", DDP_PRESET)
    cpu2 = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true")
    config = write_config(tmp_path / "ddp.yaml", tiny_models["vit"], color_set,
                          model_args={"adapter": {"method": "lora", "r": 4, "dropout": 0.1},
                                      "monitor": {"early_stopping": False, "save_last_every_n_steps": 1}},
                          data_args={"augment": {"color_jitter": 0.2}, "batch_size": 4},
                          trainer={"max_epochs": 3, "log_every_n_steps": 1})
    runs = tmp_path / "runs"
    _mmtune(["fit", *ddp, "--config", config, *cpu2, "--runs_dir", runs, "--run_name", "straight"], expect=0)
    killing = _with_killer(config, tmp_path / "killing.yaml", epoch=1, batch=2)
    base = ["fit", *ddp, *cpu2, "--runs_dir", runs, "--run_name", "resumed"]
    _mmtune([*base, "--config", killing], expect=-9)
    run = only_version(runs, "resumed")
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 7)  # 36 training images, 18 a process: 5 steps an epoch
    _mmtune([*base, "--config", config, "--ckpt_path", "last"], expect=0)
    assert only_version(runs, "resumed") == run
    assert_same_end(run, only_version(runs, "straight"), last_epoch=2)


# ---- when last.ckpt is written --------------------------------------------------------------------------
class RecordSaves(Callback):
    """(global step, training batches completed in the epoch) of every checkpoint the trainer writes: a save
    in `on_train_batch_end` comes before its batch counts as completed."""

    def __init__(self) -> None:
        self.saves: list[tuple[int, int]] = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saves.append((trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.current.completed))


def test_step_saves_skip_the_step_a_validation_follows_and_the_middle_of_accumulation(tmp_path, tiny_models, color_set):
    from mmtune import ImageClassificationData, ImageClassificationTask, ModelSpec

    task = ImageClassificationTask(model=ModelSpec(name=str(tiny_models["vit"])),
                                   monitor=MonitorSpec(early_stopping=False, save_best=False, save_last_every_n_steps=1))
    record = RecordSaves()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False, callbacks=[record],
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                        num_sanity_val_steps=0)
    trainer.fit(task, ImageClassificationData(path=str(color_set), batch_size=4, num_workers=0))
    assert trainer.num_training_batches == 9 and trainer.global_step == 5  # 35 training images, the short batch kept
    # steps 1-4 at the end of their second batch (never after the first); step 5, the epoch's last, only by the
    # validation after it (a step save there would make Lightning skip the validation's save of the same step)
    assert record.saves == [(1, 1), (2, 3), (3, 5), (4, 7), (5, 9)]


def test_save_last_every_n_steps_must_not_be_negative():
    with pytest.raises(ConfigError, match="monitor.save_last_every_n_steps must be 0 or more, got -1"):
        MonitorSpec(save_last_every_n_steps=-1)
