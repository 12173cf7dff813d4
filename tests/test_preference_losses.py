"""The preference losses (DPO, IPO, KTO, ORPO, SimPO): each equals its formula computed by hand on a fixed
batch of log-probabilities, and TRL 1.16's implementation on the same inputs (ORPO's `odds_ratio_loss`,
CPO's SimPO `cpo_loss`; DPO and KTO, whose losses TRL computes inside its trainers, through
`DPOTrainer.compute_loss`/`KTOTrainer.compute_loss` on the same tiny model and token batch); unpaired
rows and their errors; a tiny fit with each loss through the CLI."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import run_cli
from support.text import WORDS, build_model, write_jsonl
from mmtune.data.preference import UnpairedCollator, read_preference_row, unpair
from mmtune.errors import ConfigError, DataError
from mmtune.losses.preference import (PREFERENCE_LOSSES, PreferenceSpec, SequenceLogps, dpo_loss, ipo_loss, kto_loss,
                                      orpo_loss, simpo_loss)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

# Two pairs: summed log-probabilities of the chosen/rejected replies, their token counts, and the reference's.
CHOSEN, REJECTED = [-4.0, -9.5], [-6.0, -7.25]
REF_CHOSEN, REF_REJECTED = [-5.0, -9.0], [-5.5, -8.0]
N_CHOSEN, N_REJECTED = [4, 5], [3, 6]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_by_hand():
    beta = 0.3
    got = dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta)
    for i in range(2):
        margin = (CHOSEN[i] - REF_CHOSEN[i]) - (REJECTED[i] - REF_REJECTED[i])
        assert got["loss"][i].item() == pytest.approx(-math.log(sigmoid(beta * margin)), rel=1e-12)
        assert got["reward_margin"][i].item() == pytest.approx(beta * margin, rel=1e-12)
        assert got["accuracy"][i].item() == float(margin > 0)
    assert got["accuracy"].tolist() == [1.0, 0.0]  # the fixed batch has one pair each way


def test_ipo_by_hand():
    beta = 0.2
    got = ipo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), t(N_CHOSEN), t(N_REJECTED), beta)
    for i in range(2):
        delta = (CHOSEN[i] - REF_CHOSEN[i]) / N_CHOSEN[i] - (REJECTED[i] - REF_REJECTED[i]) / N_REJECTED[i]
        assert got["loss"][i].item() == pytest.approx((delta - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_simpo_by_hand():
    beta, gamma = 2.0, 0.7
    got = simpo_loss(t(CHOSEN), t(REJECTED), t(N_CHOSEN), t(N_REJECTED), beta, gamma)
    for i in range(2):
        diff = CHOSEN[i] / N_CHOSEN[i] - REJECTED[i] / N_REJECTED[i]
        assert got["loss"][i].item() == pytest.approx(-math.log(sigmoid(beta * diff - gamma)), rel=1e-12)
        assert got["reward_margin"][i].item() == pytest.approx(beta * diff, rel=1e-12)


def test_orpo_by_hand():
    lam = 0.25
    got = orpo_loss(t(CHOSEN), t(REJECTED), t(N_CHOSEN), t(N_REJECTED), lam)
    for i in range(2):
        pc, pr = math.exp(CHOSEN[i] / N_CHOSEN[i]), math.exp(REJECTED[i] / N_REJECTED[i])
        log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        nll = -CHOSEN[i] / N_CHOSEN[i]
        assert got["log_odds"][i].item() == pytest.approx(log_odds, rel=1e-10)
        assert got["loss"][i].item() == pytest.approx(nll - lam * math.log(sigmoid(log_odds)), rel=1e-10)


def test_kto_by_hand():
    beta, wd, wu = 0.5, 1.0, 1.5
    policy, reference = [-4.0, -6.0, -9.5, -7.25], [-5.0, -5.5, -9.0, -8.0]
    desirable = [True, False, True, False]
    kl_policy, kl_reference = [-7.0, -5.0, -8.0, -6.0], [-7.5, -5.25, -8.25, -6.5]
    got = kto_loss(t(policy), t(reference), torch.tensor(desirable), t(kl_policy), t(kl_reference), beta, wd, wu)
    z = max(0.0, sum(p - r for p, r in zip(kl_policy, kl_reference)) / 4)
    assert got["kl"].item() == pytest.approx(z)
    for i in range(4):
        ratio = policy[i] - reference[i]
        want = wd * (1 - sigmoid(beta * (ratio - z))) if desirable[i] else wu * (1 - sigmoid(beta * (z - ratio)))
        assert got["loss"][i].item() == pytest.approx(want, rel=1e-12)
        assert got["accuracy"][i].item() == float((ratio > 0) == desirable[i])
    # the reference point never goes below zero
    low = kto_loss(t(policy), t(reference), torch.tensor(desirable), t(kl_reference), t(kl_policy), beta)
    assert low["kl"].item() == 0.0


def test_the_registry_selects_by_name_and_says_what_each_loss_needs():
    assert {"dpo", "sigmoid", "ipo", "kto", "orpo", "simpo"} <= set(PREFERENCE_LOSSES)
    assert not PREFERENCE_LOSSES.get("orpo").needs_reference and not PREFERENCE_LOSSES.get("simpo").needs_reference
    assert PREFERENCE_LOSSES.get("kto").unpaired and PREFERENCE_LOSSES.get("dpo").needs_reference
    x = SequenceLogps(t(CHOSEN + REJECTED), t(N_CHOSEN + N_REJECTED), t(REF_CHOSEN + REF_REJECTED))
    spec = PreferenceSpec(beta=0.3, loss="dpo")
    via_registry = PREFERENCE_LOSSES.get("dpo").compute(x, spec)["loss"]
    assert torch.equal(via_registry, dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), 0.3)["loss"])
    with pytest.raises(ConfigError, match="unknown preference loss 'kt'.*kto"):
        PREFERENCE_LOSSES.get("kt")
    with pytest.raises(ConfigError, match="beta must be positive"):
        PreferenceSpec(beta=0)


# ---- against TRL ----------------------------------------------------------------------------------------

def test_orpo_equals_trl_odds_ratio_loss():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    lam = 0.25
    chosen_mean, rejected_mean = t(CHOSEN) / t(N_CHOSEN), t(REJECTED) / t(N_REJECTED)  # TRL's average_log_prob
    fake = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device="cpu"))
    losses, *_ , log_odds = ORPOTrainer.odds_ratio_loss(fake, chosen_mean, rejected_mean)
    ours = orpo_loss(t(CHOSEN), t(REJECTED), t(N_CHOSEN), t(N_REJECTED), lam)
    # TRL minimizes nll - losses.mean() with losses = lam * logsigmoid(log odds)
    assert torch.allclose(ours["loss"] - ours["nll"], -losses.double(), atol=1e-6)
    assert ours["log_odds"].mean().item() == pytest.approx(log_odds.item(), rel=1e-6)


def test_simpo_equals_trl_cpo_simpo_loss():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    beta, gamma = 2.0, 0.7
    fake = SimpleNamespace(beta=beta, simpo_gamma=gamma, alpha=0.0, label_smoothing=0.0, loss_type="simpo",
                           accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, t(CHOSEN) / t(N_CHOSEN), t(REJECTED) / t(N_REJECTED))
    ours = simpo_loss(t(CHOSEN), t(REJECTED), t(N_CHOSEN), t(N_REJECTED), beta, gamma)
    assert torch.allclose(ours["loss"], losses, atol=1e-12)
    assert torch.allclose(ours["reward_margin"], chosen_rewards - rejected_rewards, atol=1e-12)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return build_model("qwen2", tmp_path_factory.mktemp("pref_lm"))


def _trl_trainer(cls, config, path, rows, seed):
    """A TRL trainer on a tiny model with a fresh LoRA (its reference: the base with the adapter off, as
    in mmtune), whose B matrices are then made random so the policy differs from the reference."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = cls(model=AutoModelForCausalLM.from_pretrained(path), args=config, train_dataset=Dataset.from_list(rows),
                  processing_class=AutoTokenizer.from_pretrained(path),
                  peft_config=LoraConfig(r=4, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return trainer, trainer.model


def _completion_logps(model, input_ids, attention_mask, completion_mask):
    """mmtune's sequence log-probabilities (the task's `sequence_logps`) of the completion tokens."""
    from mmtune.tasks.dpo import sequence_logps

    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return sequence_logps(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)


def _trl_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], use_cpu=True,
               max_steps=1, save_strategy="no", disable_dropout=True, **kw)


def test_dpo_equals_trl_dpo_trainer_on_the_same_batch(tmp_path, qwen2):
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt": f"Repeat: {w}", "chosen": f"{w} {w}", "rejected": o} for w, o in zip(WORDS[:4], WORDS[4:8])]
    trainer, model = _trl_trainer(DPOTrainer, _trl_args(DPOConfig, tmp_path, beta=0.3), qwen2, rows, seed=0)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch)
        args = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        policy = _completion_logps(model, *args)[0]
        with model.disable_adapter():
            reference = _completion_logps(model, *args)[0]
    ours = PREFERENCE_LOSSES.get("dpo").compute(SequenceLogps(policy, None, reference), PreferenceSpec(beta=0.3))
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # the policy is not its reference
    assert ours["loss"].mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)


def test_kto_equals_trl_kto_trainer_on_the_same_batch(tmp_path, qwen2):
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": f"Repeat: {w}", "completion": f"{w} {w}" if i % 2 else o, "label": bool(i % 2)}
            for i, (w, o) in enumerate(zip(WORDS[:4], WORDS[4:8]))]
    config = _trl_args(KTOConfig, tmp_path, beta=0.5, undesirable_weight=1.5)
    trainer, model = _trl_trainer(KTOTrainer, config, qwen2, rows, seed=1)
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch)
        main = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        kl = batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
        policy, kl_policy = _completion_logps(model, *main)[0], _completion_logps(model, *kl)[0]
        with model.disable_adapter():
            reference, kl_reference = _completion_logps(model, *main)[0], _completion_logps(model, *kl)[0]
    x = SequenceLogps(policy, None, reference, torch.as_tensor(batch["label"]), kl_policy, kl_reference)
    ours = PREFERENCE_LOSSES.get("kto").compute(x, PreferenceSpec(beta=0.5, loss="kto", undesirable_weight=1.5))
    assert ours["kl"].item() > 0  # the reference point is in play
    assert ours["loss"].mean().item() == pytest.approx(trl_loss.item(), abs=1e-5)


# ---- unpaired rows -----------------------------------------------------------------------------------------

def test_unpaired_rows_and_their_errors():
    row = read_preference_row({"prompt": "hi", "completion": "hello", "label": "false"}, "f line 1")
    assert (row.completion, row.desirable) == ("hello", False)
    conv = read_preference_row({"prompt": [{"role": "user", "content": "hi"}],
                                "completion": [{"role": "assistant", "content": "yo"}], "label": True}, "f line 2")
    assert conv.prompt == [{"role": "user", "content": "hi"}] and conv.completion == "yo" and conv.desirable
    with pytest.raises(DataError, match="f line 3: field 'label' must be true or false"):
        read_preference_row({"prompt": "hi", "completion": "a", "label": "maybe"}, "f line 3")
    with pytest.raises(DataError, match="f line 4: missing field 'prompt'"):
        read_preference_row({"completion": "a", "label": 1}, "f line 4")
    pair = read_preference_row({"prompt": "hi", "chosen": "a", "rejected": "b"}, "f line 5")
    assert [(c.completion, c.desirable, c.origin) for c in unpair(pair)] == [("a", True, "f line 5 chosen"),
                                                                              ("b", False, "f line 5 rejected")]


def test_unpaired_batches_rotate_completions_within_the_batch():
    from mmtune.data.preference import CompletionTokens

    rows = [[CompletionTokens([1, 2, 10 + i, 20 + i], [-100, -100, 10 + i, 20 + i], f"r{i}", {}, 2, i % 2 == 0)]
            for i in range(3)]
    batch = UnpairedCollator(pad_id=0, max_length=16)(rows)
    assert batch["desirable"].tolist() == [True, False, True] and batch["origins"] == ["r0", "r1", "r2"]
    # row i's prompt with row i-1's completion (TRL's rotation)
    assert batch["input_ids"][3:].tolist() == [[1, 2, 12, 22], [1, 2, 10, 20], [1, 2, 11, 21]]
    assert batch["labels"][3:, 2:].tolist() == [[12, 22], [10, 20], [11, 21]]


def kto_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w, other = rng.sample(WORDS, 2)
        good = i % 2 == 0
        rows.append({"prompt": f"Repeat: {w}", "completion": f"{w} {w}" if good else other, "label": good})
    return rows


def pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Repeat: {w}", "chosen": f"{w} {w}", "rejected": o}
            for w, o in (rng.sample(WORDS, 2) for _ in range(n))]


def _config(tmp_path, model, train, val, preference, adapter=None):
    import yaml

    cfg = tmp_path / f"pref_{preference['loss']}.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"class_path": "DPOTask", "init_args": {
            "model": {"name": str(model)}, "adapter": adapter or {"method": "lora", "r": 8},
            "optimizer": {"lr": 0.01, "warmup": 0}, "preference": preference,
            "monitor": {"early_stopping": False}}},
        "data": {"class_path": "PreferenceData", "init_args": {"path": str(train), "val_path": str(val), "test_path": str(val),
                                                              "max_length": 64, "batch_size": 8}},
        "trainer": {"accelerator": "cpu", "max_epochs": 3, "enable_progress_bar": False,
                    "enable_model_summary": False, "num_sanity_val_steps": 0},
    }))
    return cfg


@pytest.mark.parametrize("preference", [{"loss": "kto", "beta": 0.5}, {"loss": "orpo", "orpo_lambda": 0.5},
                                        {"loss": "simpo", "beta": 2.0, "gamma": 0.5}], ids=lambda p: p["loss"])
def test_each_loss_fits_end_to_end_through_the_cli(tmp_path, qwen2, preference):
    if preference["loss"] == "kto":
        train, val = write_jsonl(tmp_path / "train.jsonl", kto_rows(48, 0)), write_jsonl(tmp_path / "val.jsonl", kto_rows(16, 1))
    else:
        train, val = write_jsonl(tmp_path / "train.jsonl", pairs(48, 0)), write_jsonl(tmp_path / "val.jsonl", pairs(16, 1))
    cfg = _config(tmp_path, qwen2, train, val, preference)
    runs = tmp_path / "runs"
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = runs / cfg.stem / "version_0"
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    header, values = rows[0], rows[1:]
    col = header.index("val/accuracy")
    accuracy = [float(r[col]) for r in values if r[col]]
    loss_col = header.index("val/loss")
    losses = [float(r[loss_col]) for r in values if r[loss_col]]
    margin_col = header.index("val/reward_margin")
    margins = [float(r[margin_col]) for r in values if r[margin_col]]
    print(preference["loss"], losses, accuracy, margins)
    assert losses[-1] < losses[0] and margins[-1] > margins[0] > 0  # it learned the preference
    # KTO's accuracy counts rows whose reward has the label's sign, a harder test than a pair's order
    assert accuracy[-1] >= (0.75 if preference["loss"] == "kto" else 0.85)
    if preference["loss"] == "kto":
        assert "train/kl" in header
    run_cli("test", "--config", cfg, "--ckpt_path", run / "checkpoints/best.ckpt", "--runs_dir", runs)
    records = [json.loads(line) for line in (run / "records/test.jsonl").read_text().splitlines()[1:]]
    assert records and all("loss" in r["stats"] for r in records)


def test_reference_free_losses_skip_the_reference_pass(tmp_path, qwen2):
    """ORPO and SimPO never run the reference (no forward with adapters off) and keep no reference copy
    when the whole model trains; DPO refuses unpaired rows, KTO splits pairs into two rows."""
    import lightning as L

    from mmtune import AdapterSpec, DPOTask, ModelSpec, MonitorSpec, OptimizerSpec, PreferenceData

    train = write_jsonl(tmp_path / "train.jsonl", pairs(8, 0))
    for loss in ("orpo", "simpo"):
        task = DPOTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", r=4), OptimizerSpec(lr=0.01, warmup=0),
                       MonitorSpec(early_stopping=False, save_best=False, save_last=False),
                       preference=PreferenceSpec(loss=loss))
        dm = PreferenceData(path=str(train), val_path=str(train), max_length=64, batch_size=4)
        trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, default_root_dir=tmp_path)
        task.configure_model()
        task._reference_logps = lambda batch: pytest.fail("a reference pass")  # noqa: B023
        trainer.fit(task, datamodule=dm)
        full = DPOTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="none"), preference=PreferenceSpec(loss=loss))
        full.configure_model()
        assert full._ref is None
    unpaired = write_jsonl(tmp_path / "unpaired.jsonl", kto_rows(8, 0))
    task = DPOTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", r=4), preference=PreferenceSpec(loss="dpo"))
    dm = PreferenceData(path=str(unpaired), max_length=64, batch_size=4)
    dm.setup("fit")
    with pytest.raises(DataError, match="unpaired row .* needs preference.loss: kto"):
        task.connect_data(dm)
    kto = DPOTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", r=4), preference=PreferenceSpec(loss="kto"))
    dm = PreferenceData(path=str(train), max_length=64, batch_size=4)
    dm.setup("fit")
    kto.connect_data(dm)
    assert sum(len(v) for v in dm.tokenized.values()) == 16  # each pair became a desirable and an undesirable row
