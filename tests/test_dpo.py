"""DPO/IPO on tiny models: the reference is the base with adapters off, the loss starts at log 2 and falls,
reward margin and preference accuracy are logged; preference data formats and errors."""

from __future__ import annotations

import json
import math
import random

import lightning as L
import pytest
import torch

from conftest import run_cli
from support.text import WORDS, build_model, write_jsonl
from mmtune import AdapterSpec, DPOTask, ModelSpec, MonitorSpec, OptimizerSpec, PreferenceData, PreferenceSpec
from mmtune.data.preference import row_to_preference
from mmtune.data.text import IGNORE
from mmtune.errors import DataError


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_model("qwen2", tmp_path_factory.mktemp("dpo_lm"))


def pairs(n: int, seed: int) -> list[dict]:
    """Chosen: the word repeated; rejected: another word (a preference a tiny model learns fast)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w, other = rng.sample(WORDS, 2)
        if i % 2:
            rows.append({"prompt": f"Repeat: {w}", "chosen": f"{w} {w}", "rejected": f"{other}"})
        else:  # the messages form
            head = [{"role": "user", "content": f"Repeat: {w}"}]
            rows.append({"chosen": head + [{"role": "assistant", "content": f"{w} {w}"}],
                         "rejected": head + [{"role": "assistant", "content": other}]})
    return rows


def test_preference_rows_and_errors():
    p = row_to_preference({"prompt": "hi", "chosen": "a", "rejected": "b"}, "f line 1")
    assert p.prompt == [{"role": "user", "content": "hi"}] and (p.chosen, p.rejected) == ("a", "b")
    with pytest.raises(DataError, match="f line 3: missing field 'rejected'"):
        row_to_preference({"prompt": "hi", "chosen": "a"}, "f line 3")
    with pytest.raises(DataError, match="do not share"):
        row_to_preference({"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a"}],
                           "rejected": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "b"}]}, "f line 4")


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_dpo_with_lora_uses_the_base_as_reference_and_learns_the_preference(tmp_path, qwen2, loss):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(48, 0))
    val = write_jsonl(tmp_path / "val.jsonl", pairs(16, 1))
    task = DPOTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", r=8), OptimizerSpec(lr=0.01, warmup=0),
                   MonitorSpec(early_stopping=False, save_best=False, save_last=False),
                   preference=PreferenceSpec(beta=0.5, loss=loss))
    dm = PreferenceData(path=str(train), val_path=str(val), max_length=64, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]
    # untrained LoRA (B = 0) equals the reference: every implicit reward is zero
    start = math.log(2) if loss == "sigmoid" else (1 / (2 * 0.5)) ** 2
    assert abs(before["val/loss"] - start) < 1e-4 and abs(before["val/reward_margin"]) < 1e-5
    batch = next(iter(dm.val_dataloader()))
    n = len(batch["input_ids"]) // 2
    assert torch.equal(batch["input_ids"][:n].ne(0).sum(1) > 0, torch.ones(n, dtype=torch.bool))
    assert all((row != IGNORE).sum() >= 1 for row in batch["labels"])
    trainer.fit(task, datamodule=dm)
    logged = set(trainer.callback_metrics)
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]
    print(loss, before, after)
    assert after["val/loss"] < 0.7 * before["val/loss"] and after["val/accuracy"] >= 0.9
    assert after["val/reward_margin"] > 0.5
    assert task._ref is None  # no second copy of the model
    assert {"train/loss", "train/reward_margin", "train/accuracy"} <= logged


def test_full_dpo_keeps_a_frozen_reference_outside_the_checkpoint(tmp_path, qwen2):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(16, 0))
    task = DPOTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="none"), OptimizerSpec(lr=1e-3, warmup=0),
                   MonitorSpec(early_stopping=False, save_best=False, save_last=False))
    dm = PreferenceData(path=str(train), val_path=str(train), max_length=64, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    assert abs(trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"] - math.log(2)) < 1e-4
    trainer.fit(task, datamodule=dm)
    assert task._ref is not None and not any(p.requires_grad for p in task._ref.parameters())
    assert not any("_ref" in k for k in task.state_dict())
    assert trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"] < math.log(2)


def test_dpo_through_the_cli_and_export(tmp_path, qwen2):
    import yaml
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", pairs(16, 0))
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"class_path": "DPOTask", "init_args": {
            "model": {"name": str(qwen2)}, "adapter": {"method": "lora", "r": 4},
            "optimizer": {"lr": 0.01, "warmup": 0}, "preference": {"beta": 0.2, "loss": "ipo"}}},
        "data": {"class_path": "PreferenceData", "init_args": {"path": str(train), "val_path": str(train),
                                                              "max_length": 64, "batch_size": 8}},
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "enable_progress_bar": False, "enable_model_summary": False},
    }))
    runs = tmp_path / "runs"
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = runs / "dpo" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())["fit"]["metrics"]
    assert {"val/loss", "val/reward_margin", "val/accuracy"} <= set(metrics)
    run_cli("export", "--ckpt_path", run / "checkpoints/best.ckpt", "--out", tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None
    from mmtune.tasks.common import load_task

    task = load_task(str(run / "checkpoints/best.ckpt"))
    assert task.preference_spec == PreferenceSpec(beta=0.2, loss="ipo")
