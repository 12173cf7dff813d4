"""GRPO on tiny models: the group advantages and clipped loss equal a hand computation (and the loss TRL's
code computes), the built-in and user rewards, the reference at step 0, and a toy task with a verifiable
reward whose mean reward rises within a few dozen steps; kill-and-resume reaches the uninterrupted run
(tests/test_resume.py's check)."""

from __future__ import annotations

import json
import math
import random

import lightning as L
import pytest
import torch
import yaml

from support.text import WORDS, build_model, write_jsonl
from mmtune import AdapterSpec, GRPOSpec, GRPOTask, ModelSpec, MonitorSpec, OptimizerSpec, PromptData, RewardSpec
from mmtune.data.prompts import row_to_prompt
from mmtune.errors import ConfigError, DataError
from mmtune.losses.grpo import group_advantages, grpo_loss
from mmtune.rewards import build_rewards, combine_rewards, exact_match, length_penalty, regex_format, score_rewards
from mmtune.tasks.grpo_rollout import completion_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

A_SHARE = "support.grpo_rewards:a_share"


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_model("qwen2", tmp_path_factory.mktemp("grpo_lm"))


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Say a word: {w}", "answer": w} for w in (rng.choice(WORDS) for _ in range(n))]


# ---- the objective, by hand ----------------------------------------------------------------------------
def test_group_advantages_match_a_hand_computation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, "group")
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased std of [1, 0, 0, 1]
    want = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert adv.tolist() == pytest.approx(want, abs=1e-6)  # a group of equal rewards has no advantage, not NaN
    assert group_advantages(rewards, 4, "none").tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    batch_std = float(rewards.std())
    assert group_advantages(rewards, 4, "batch")[0].item() == pytest.approx(0.5 / (batch_std + 1e-4))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_clipped_loss_and_k3_kl_match_a_hand_computation(loss_type):
    # two completions of three tokens (the second has two), ratios on both sides of the clip range
    logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, -9.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -0.5, -1.0], [-0.2, -1.0, -1.0]])
    ref = torch.tensor([[-1.2, -0.7, -2.0], [-0.4, -1.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    beta, eps = 0.1, 0.2
    terms = grpo_loss(logps, old, mask, adv, ref, beta, eps, None, loss_type, max_completion_length=4)

    per_token, kls, low, high = [], [], 0, 0
    for i in range(2):
        row = []
        for t in range(3):
            if not mask[i, t]:
                continue
            r = math.exp(logps[i, t].item() - old[i, t].item())
            a = adv[i].item()
            c = min(max(r, 1 - eps), 1 + eps)
            d = ref[i, t].item() - logps[i, t].item()
            kl = math.exp(d) - d - 1
            kls.append(kl)
            row.append(-min(r * a, c * a) + beta * kl)
            low += r < 1 - eps and a < 0
            high += r > 1 + eps and a > 0
        per_token.append(row)
    flat = [x for row in per_token for x in row]
    want = {"grpo": sum(sum(r) / len(r) for r in per_token) / 2, "bnpo": sum(flat) / len(flat),
            "dapo": sum(flat) / len(flat), "dr_grpo": sum(flat) / (2 * 4)}[loss_type]
    assert terms["loss"].item() == pytest.approx(want, rel=1e-6)
    assert terms["kl"].item() == pytest.approx(sum(kls) / len(kls), rel=1e-6)
    # r = e^0.5 > 1.2 with A > 0 and r = e^-0.5 < 0.8 with A < 0 are clipped; r = e^-1 with A > 0 is not
    assert (low, high) == (1, 1)
    assert terms["clip_ratio_high"].item() == pytest.approx(1 / 5) and terms["clip_ratio_low"].item() == pytest.approx(1 / 5)
    assert terms["clip_ratio"].item() == pytest.approx(2 / 5)
    terms["loss"].backward()
    # the clipped token carries only the KL gradient: d/dlogp beta*(e^d - d - 1) = beta*(1 - e^d)
    d = ref[0, 0].item() - logps[0, 0].item()
    scale = {"grpo": 1 / 3 / 2, "bnpo": 1 / 5, "dapo": 1 / 5, "dr_grpo": 1 / 8}[loss_type]
    assert logps.grad[0, 0].item() == pytest.approx(beta * (1 - math.exp(d)) * scale, rel=1e-5)
    assert logps.grad[1, 2].item() == 0  # masked


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_clipped_loss_equals_trls_on_the_same_batch(loss_type):
    """TRL's own `GRPOTrainer._compute_loss` on the batch above: a stand-in object gives it the token
    log-probabilities (instead of a model forward) and one process's plumbing; the loss, KL and clip
    share come from TRL's code."""
    pytest.importorskip("trl", reason="TRL is a dev dependency")
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import GRPOTrainer

    logps = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, -9.0]])
    old = torch.tensor([[-1.5, -0.5, -1.0], [-0.2, -1.0, -1.0]])
    ref = torch.tensor([[-1.2, -0.7, -2.0], [-0.4, -1.5, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, -2.0])

    class OneProcess:
        num_processes, sync_gradients = 1, True

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=0.1, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.2,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=False),
        current_gradient_accumulation_steps=1, max_completion_length=4, _entropy_bonus_enabled=False,
        accelerator=OneProcess(), _metrics={"eval": defaultdict(list), "train": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(2, 1, dtype=torch.long), "prompt_mask": torch.ones(2, 1, dtype=torch.long),
              "completion_ids": torch.zeros(2, 3, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    trl_loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    ours = grpo_loss(logps, old, mask.float(), adv, ref, 0.1, 0.2, None, loss_type, max_completion_length=4)
    assert ours["loss"].item() == pytest.approx(trl_loss.item(), rel=1e-6)
    assert ours["kl"].item() == pytest.approx(trainer._metrics["eval"]["kl"][0], rel=1e-6)
    assert ours["clip_ratio"].item() == pytest.approx(trainer._metrics["eval"]["clip_ratio/region_mean"][0], rel=1e-6)


def test_completion_mask_ends_at_the_first_stop_token():
    ids = torch.tensor([[5, 6, 2, 7], [5, 5, 5, 5], [2, 9, 2, 9]])
    mask, truncated = completion_mask(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]] and truncated.tolist() == [False, True, False]


# ---- rewards -----------------------------------------------------------------------------------------------
def test_builtin_rewards():
    assert exact_match(["so 3 + 4 = 7\n#### 7", "#### 8", "no answer"], answer=["3+4 is\n#### 7", "7", "7"]) == [1, 0, 0]
    assert exact_match(["#### 1,000"], answer=["1000.0"]) == [1.0]
    with pytest.raises(DataError, match="column 'answer'"):
        exact_match(["#### 1"], solution=["1"])
    fmt = "<answer>.*?</answer>"
    assert regex_format(["x <answer>4</answer>", "4"], pattern=fmt) == [1, 0]
    assert regex_format(["x <answer>4</answer>"], pattern=fmt, mode="fullmatch") == [0]
    assert length_penalty(["a", "b"], completion_lengths=[10, 30], target=20) == [0, -0.5]


def test_rewards_combine_with_weights_and_user_functions():
    specs = [RewardSpec(function="regex_format", weight=2.0, kwargs={"pattern": "cat"}),
             RewardSpec(function="support.grpo_rewards:echoes_answer", weight=0.5)]
    rewards = build_rewards(specs)
    context = {"prompts": [[{"role": "user", "content": "p"}]] * 3, "completions": ["cat dog", "dog", " "],
               "completion_lengths": [2, 1, 1], "answer": ["dog", "cat", "x"]}
    scores = score_rewards(rewards, context)
    assert scores["regex_format"].tolist() == [1, 0, 0]
    assert scores["echoes_answer"][:2].tolist() == [1, 0] and math.isnan(scores["echoes_answer"][2])
    assert combine_rewards(rewards, scores).tolist() == [2.5, 0.0, 0.0]  # no score counts as 0


def test_reward_and_grpo_config_errors(qwen2):
    with pytest.raises(ConfigError, match="exactly one of"):
        RewardSpec(function="exact_match", model="x")
    with pytest.raises(ConfigError, match="neither a built-in"):
        RewardSpec(function="exact_matc")
    with pytest.raises(ConfigError, match="cannot import"):
        build_rewards([RewardSpec(function="no_such_module:f")])
    with pytest.raises(ConfigError, match="at least 2"):
        GRPOSpec(num_generations=1)
    with pytest.raises(ConfigError, match="needs rewards"):
        GRPOTask(ModelSpec(name=str(qwen2)))
    with pytest.raises(ConfigError, match="vllm"):
        GRPOTask(ModelSpec(name=str(qwen2)), grpo=GRPOSpec(backend="vllm"), rewards=[RewardSpec(function=A_SHARE)])
    with pytest.raises(DataError, match="f line 2: the prompt's last turn"):
        row_to_prompt({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "f line 2")
    row = row_to_prompt({"prompt": "2+2?", "answer": "4", "level": 1}, "f line 1")
    assert row.messages == [{"role": "user", "content": "2+2?"}] and row.meta == {"answer": "4", "level": 1}


# ---- training -------------------------------------------------------------------------------------------------
def _task(model_dir, adapter="lora", lr=0.02, **grpo) -> GRPOTask:
    spec = {"num_generations": 8, "max_new_tokens": 8, **grpo}
    return GRPOTask(ModelSpec(name=str(model_dir)), AdapterSpec(method=adapter, r=8, alpha=16),
                    OptimizerSpec(lr=lr, warmup=0, weight_decay=0.0),
                    MonitorSpec(metric="val/reward", mode="max", early_stopping=False, save_best=False, save_last=False),
                    grpo=GRPOSpec(**spec), rewards=[RewardSpec(function=A_SHARE)])


@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_the_reference_equals_the_policy_at_the_start(tmp_path, qwen2, adapter):
    task = _task(qwen2, adapter, beta=0.1)
    dm = PromptData(path=str(write_jsonl(tmp_path / "p.jsonl", prompt_rows(4, 0))), split=(1, 0, 0), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)  # builds and connects; one step
    assert (task._ref is None) == (adapter == "lora")  # LoRA: the base with adapters off, no second copy
    fresh = _task(qwen2, adapter, beta=0.1)
    fresh.configure_model()
    dm.connect(fresh.tokenizer)
    torch.manual_seed(0)
    rollout = fresh.rollout(next(iter(dm.train_dataloader())))
    assert rollout.input_ids.shape[0] == 32 and rollout.ref_logps is not None
    terms = fresh.loss_terms(rollout.rows(slice(None)), rollout.prompt_len)
    assert terms["kl"].item() == pytest.approx(0.0, abs=1e-6) and terms["clip_ratio"].item() == 0


def test_grpo_raises_the_mean_reward_of_a_toy_task(tmp_path, qwen2):
    rows = prompt_rows(32, 0)
    dm = PromptData(path=str(write_jsonl(tmp_path / "train.jsonl", rows)),
                    val_path=str(write_jsonl(tmp_path / "val.jsonl", prompt_rows(8, 1))), batch_size=4, max_length=64)
    task = _task(qwen2, beta=0.04)
    seen: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/reward"]))

    trainer = L.Trainer(accelerator="cpu", max_steps=30, default_root_dir=tmp_path, callbacks=[Record()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, logger=L.pytorch.loggers.CSVLogger(tmp_path))
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/reward"]
    trainer.fit(task, datamodule=dm)
    after = trainer.callback_metrics["val/reward"].item()
    first, last = sum(seen[:5]) / 5, sum(seen[-5:]) / 5
    print("train reward", first, "->", last, "; val", before, "->", after)
    assert last > first + 0.2 and after > before + 0.2
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "train/kl", "train/clip_ratio", "train/completion_length", "train/reward/a_share",
            "val/reward", "val/reward/a_share"} <= logged
    samples = {p.name: p for p in (tmp_path / "lightning_logs").rglob("samples/val_step_*.jsonl")}
    assert "val_step_30.jsonl" in samples  # the validation at the step limit
    line = json.loads(samples["val_step_30.jsonl"].read_text().splitlines()[0])
    assert {"origin", "messages", "completion", "reward", "rewards", "tokens"} <= set(line)


def test_several_iterations_per_generation_step_the_optimizer_each_time(tmp_path, qwen2):
    dm = PromptData(path=str(write_jsonl(tmp_path / "p.jsonl", prompt_rows(8, 0))), split=(1, 0, 0), batch_size=4)
    task = _task(qwen2, lr=0.05, num_iterations=3, micro_batch_size=12, beta=0.0, epsilon=0.05)
    clipped: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clipped.append(float(trainer.callback_metrics["train/clip_ratio"]))

    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, callbacks=[Record()],
                        default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 2 * 2 * 3  # 2 batches an epoch, 3 optimizer steps each
    assert max(clipped) > 0  # the later iterations move the ratio out of the narrow clip range
    assert "train/kl" not in trainer.callback_metrics  # beta 0: no reference pass


def grpo_config(path, model_dir, train, val, trainer: dict, **model_args):
    path.write_text(yaml.safe_dump({
        "model": {"class_path": "GRPOTask", "init_args": {
            "model": {"name": str(model_dir)}, "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            "optimizer": {"lr": 0.02, "warmup": 0.2, "weight_decay": 0.0},
            "grpo": {"num_generations": 4, "max_new_tokens": 6, "beta": 0.04},
            "rewards": [{"function": A_SHARE}, {"function": "length_penalty", "weight": 0.1, "kwargs": {"target": 4}}],
            **model_args}},
        "data": {"class_path": "PromptData", "init_args": {"path": str(train), "val_path": str(val), "batch_size": 2,
                                                          "max_length": 64}},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1, **trainer},
    }))
    return path


def test_grpo_resumes_mid_epoch_exactly_and_exports(tmp_path, qwen2):
    from conftest import run_cli
    from test_resume import kill_and_resume
    from transformers import AutoModelForCausalLM

    train = write_jsonl(tmp_path / "train.jsonl", prompt_rows(8, 0))
    val = write_jsonl(tmp_path / "val.jsonl", prompt_rows(3, 1))
    config = grpo_config(tmp_path / "grpo.yaml", qwen2, train, val, {"max_epochs": 3},
                         monitor={"metric": "val/reward", "mode": "max", "early_stopping": False,
                                  "save_last_every_n_steps": 2})
    # 4 steps an epoch: killed at epoch 1 batch 3, last saved at step 6 (epoch 1, batch 2)
    run = kill_and_resume(tmp_path, config, epoch=1, batch=3, saved_step=6, last_epoch=2)
    assert (run / "samples" / "val_step_12.jsonl").is_file()
    run_cli("export", "--ckpt_path", run / "checkpoints" / "best.ckpt", "--out", tmp_path / "merged")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged") is not None


@pytest.mark.slow
def test_grpo_under_two_process_ddp_splits_prompts_and_keeps_ranks_in_step(tmp_path, qwen2):
    """Two gloo processes with the DDP preset: each rank samples its own prompts' groups, the token-mean
    loss is reduced over both, and DDP keeps the adapters equal; validation writes every prompt once."""
    import csv

    from support.ddp_runs import fit_with_ddp_preset

    train = write_jsonl(tmp_path / "train.jsonl", prompt_rows(8, 0))
    val = write_jsonl(tmp_path / "val.jsonl", prompt_rows(3, 1))  # odd: the sampler pads one rank
    probe = tmp_path / "probe"
    config = grpo_config(tmp_path / "grpo.yaml", qwen2, train, val, {
        "max_epochs": 1, "callbacks": [{"class_path": "support.rank_probe.RankProbe", "init_args": {"out_dir": str(probe)}}]},
        monitor={"metric": "val/reward", "mode": "max", "early_stopping": False})
    run = fit_with_ddp_preset(config, tmp_path / "runs", "grpo_ddp", devices=2)
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["steps"] for r in ranks] == [2, 2]  # 8 prompts, 2 a rank a step
    assert not set(ranks[0]["origins"]) & set(ranks[1]["origins"])  # each prompt trained on one rank
    assert len(ranks[0]["origins"] + ranks[1]["origins"]) == 8
    assert ranks[0]["digest"] == pytest.approx(ranks[1]["digest"], rel=1e-6)  # the same adapters on both
    samples = [json.loads(line) for line in next(run.glob("samples/val_step_*.jsonl")).read_text().splitlines()]
    assert sorted(s["origin"] for s in samples) == sorted({s["origin"] for s in samples}) and len(samples) == 3
    rewards = [r["train/reward"] for r in csv.DictReader((run / "metrics.csv").open()) if r.get("train/reward")]
    assert len(rewards) == 2
