"""Reward models on tiny models: the pairwise loss by hand (and TRL's formula), training ranks held-out pairs
above chance, export through the CLI, and the export as a GRPO reward."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import yaml

from conftest import run_cli
from support.text import build_model, write_jsonl
from test_dpo import pairs
from mmtune import (AdapterSpec, GRPOSpec, GRPOTask, ModelSpec, MonitorSpec, OptimizerSpec, PreferenceData, PromptData,
                    RewardModelTask, RewardSpec)
from mmtune.rewards.model import RewardModelScorer
from mmtune.tasks.reward_model import pairwise_terms

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_model("llama", tmp_path_factory.mktemp("rm_lm"))


def test_pairwise_loss_matches_the_bradley_terry_formula():
    scores = torch.tensor([2.0, -1.0, 0.5, 1.0, 0.0, 0.5])  # chosen: 2, -1, 0.5; rejected: 1, 0, 0.5
    terms = pairwise_terms(scores)
    want = [-math.log(1 / (1 + math.exp(-d))) for d in (1.0, -1.0, 0.0)]
    assert terms["loss"].tolist() == pytest.approx(want, rel=1e-6)
    assert terms["accuracy"].tolist() == [1, 0, 0] and terms["reward_margin"].tolist() == [1, -1, 0]
    # TRL's RewardTrainer: -logsigmoid(chosen - rejected - margin).mean()
    margin = 0.5
    trl = -torch.nn.functional.logsigmoid(scores[:3] - scores[3:] - margin).mean()
    assert pairwise_terms(scores, margin)["loss"].mean().item() == pytest.approx(trl.item())


def test_reward_model_ranks_held_out_pairs_above_chance(tmp_path, llama):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(48, 0))
    val = write_jsonl(tmp_path / "val.jsonl", pairs(24, 7))  # other words and pairings than training
    task = RewardModelTask(ModelSpec(name=str(llama)), AdapterSpec(method="lora", r=8, alpha=16),
                           OptimizerSpec(lr=5e-3, warmup=0, weight_decay=0.0),
                           MonitorSpec(early_stopping=False, save_best=False, save_last=False))
    dm = PreferenceData(path=str(train), val_path=str(val), max_length=64, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]
    trainer.fit(task, datamodule=dm)
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]
    print(before, after)
    assert after["val/accuracy"] >= 0.9 and after["val/loss"] < 0.5 * before["val/loss"]
    assert after["val/reward_margin"] > 1.0
    assert task.adapter_report.policies["head"] == "full"


def test_reward_model_cli_export_and_use_as_a_grpo_reward(tmp_path, llama):
    train = write_jsonl(tmp_path / "train.jsonl", pairs(32, 0))
    val = write_jsonl(tmp_path / "val.jsonl", pairs(12, 3))
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"class_path": "RewardModelTask", "init_args": {
            "model": {"name": str(llama)}, "adapter": {"method": "lora", "r": 8, "alpha": 16},
            "optimizer": {"lr": 5e-3, "warmup": 0, "weight_decay": 0.0}}},
        "data": {"class_path": "PreferenceData", "init_args": {"path": str(train), "val_path": str(val),
                                                              "test_path": str(val), "max_length": 64, "batch_size": 8}},
        "trainer": {"accelerator": "cpu", "max_epochs": 4, "enable_progress_bar": False, "enable_model_summary": False},
    }))
    runs = tmp_path / "runs"
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = runs / "rm" / "version_0"
    metrics = json.loads((run / "metrics.json").read_text())["fit"]
    assert metrics["monitor"] == "val/accuracy" and metrics["metrics"]["val/accuracy"] >= 0.75
    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best")
    records = (run / "records" / "test.jsonl").read_text().splitlines()
    assert json.loads(records[0])["kind"] == "preference" and len(records) == 1 + 12
    out = tmp_path / "rm_export"
    run_cli("export", "--ckpt_path", run / "checkpoints" / "best.ckpt", "--out", out)

    scorer = RewardModelScorer(str(out))
    rows = pairs(12, 3)
    prompts, chosen, rejected = [], [], []
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}] if "prompt" in row else row["chosen"][:-1]
        prompts.append(prompt)
        chosen.append(row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][-1]["content"])
        rejected.append(row["rejected"] if isinstance(row["rejected"], str) else row["rejected"][-1]["content"])
    good, bad = scorer(prompts, chosen), scorer(prompts, rejected)
    assert sum(g > b for g, b in zip(good, bad)) >= 9  # the export ranks as the trained model did

    # the export as a GRPO reward, beside a built-in one
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p[-1]["content"]} for p in prompts])
    task = GRPOTask(ModelSpec(name=str(llama)), AdapterSpec(method="lora", r=4), OptimizerSpec(lr=1e-3, warmup=0),
                    MonitorSpec(early_stopping=False, save_best=False, save_last=False),
                    grpo=GRPOSpec(num_generations=4, max_new_tokens=4),
                    rewards=[RewardSpec(model=str(out), weight=1.0),
                             RewardSpec(function="length_penalty", weight=0.1, kwargs={"target": 2})])
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=PromptData(path=str(prompt_file), split=(1, 0, 0), batch_size=2))
    assert {"train/reward/reward_model", "train/reward/length_penalty"} <= set(trainer.callback_metrics)
