"""Text SFT: data formats, loss masks, bad input, fit/validate/test/predict/export through the CLI on tiny
Llama and Qwen2 models built here, and the adapter methods."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import run_cli
from support.text import build_model, repeat_rows, sft_config, write_jsonl
from mmtune.data.text import (IGNORE, TextData, TextFields, TextSource, prompt_conversation, read_source,
                              tokenize_conversation)
from mmtune.errors import ConfigError, DataError
from mmtune.models.hf import load_tokenizer
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec
from mmtune.tasks.common import load_task
from mmtune.losses.tokens import token_loss
from mmtune.tasks.sft import CausalLMTask


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="session")
def tiny_lms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lms")
    return {kind: build_model(kind, root) for kind in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def repeat_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    return {"train": write_jsonl(root / "train.jsonl", repeat_rows(64, seed=1)),
            "val": write_jsonl(root / "val.jsonl", repeat_rows(16, seed=2))}


def _tok(tiny_lms, kind="llama"):
    return load_tokenizer(ModelSpec(name=str(tiny_lms[kind])))


def _labeled_runs(tok, item) -> list[str]:
    """The decoded stretches of consecutive labeled tokens."""
    runs, current = [], []
    for t, label in zip(item.input_ids, item.labels):
        if label != IGNORE:
            current.append(t)
        elif current:
            runs, current = runs + [tok.decode(current)], []
    return runs + ([tok.decode(current)] if current else [])


# ---- formats ----------------------------------------------------------------------------------------------
def test_every_format_and_file_type_reads_to_the_same_conversation(tmp_path):
    import pandas as pd

    alpaca = {"instruction": "Say hi.", "input": "", "output": "hi"}
    files = {
        "alpaca.jsonl": (write_jsonl(tmp_path / "alpaca.jsonl", [alpaca]), {}),
        "openai.json": (tmp_path / "openai.json", {}),
        "sharegpt.jsonl": (write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
            {"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]}]), {}),
        "mapped.jsonl": (write_jsonl(tmp_path / "mapped.jsonl", [{"dialog": [
            {"speaker": "customer", "text": "Say hi."}, {"speaker": "agent", "text": "hi"}]}]),
            {"fields": TextFields(messages="dialog", role="speaker", content="text",
                                  roles={"customer": "user", "agent": "assistant"})}),
        "pc.csv": (tmp_path / "pc.csv", {}),
        "pc.parquet": (tmp_path / "pc.parquet", {}),
    }
    (tmp_path / "openai.json").write_text(json.dumps([{"messages": [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}]))
    pd.DataFrame([{"prompt": "Say hi.", "completion": "hi"}]).to_csv(tmp_path / "pc.csv", index=False)
    pd.DataFrame([{"prompt": "Say hi.", "completion": "hi"}]).to_parquet(tmp_path / "pc.parquet")
    expected = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    for name, (path, kwargs) in files.items():
        samples = read_source(TextSource(str(path), **kwargs))
        assert [s.messages for s in samples] == [expected], name
    text = read_source(TextSource(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "once upon a time"}]))))
    assert text[0].text == "once upon a time"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_loss_on_assistant_tokens_only_unless_switched_off(tiny_lms, kind):
    """Llama's own template has no {% generation %} markers (prefix rendering finds the replies); Qwen2
    has no template and gets the built-in ChatML (with markers)."""
    tok = _tok(tiny_lms, kind)
    conv = read_source(TextSource(str(write_jsonl(tiny_lms[kind].parent / f"{kind}.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Repeat cat."},
        {"role": "assistant", "content": "cat cat cat"}, {"role": "user", "content": "Repeat dog."},
        {"role": "assistant", "content": "dog dog"}]}]))))[0]
    item = tokenize_conversation(tok, conv, assistant_only=True)
    end = "</s>" if kind == "llama" else "<|im_end|>"
    assert [r.strip() for r in _labeled_runs(tok, item)] == [f"cat cat cat{end}", f"dog dog{end}"]
    everything = tokenize_conversation(tok, conv, assistant_only=False)
    assert everything.labels == everything.input_ids and everything.input_ids == item.input_ids


# ---- bad input --------------------------------------------------------------------------------------------
def _data(path, **kwargs) -> TextData:
    dm = TextData(path=str(path), split=(1.0, 0.0, 0.0), **kwargs)
    dm.setup("fit")
    return dm


def test_bad_rows_name_file_and_line(tmp_path, tiny_lms):
    rows = repeat_rows(3)
    del rows[1]["output"]
    bad = write_jsonl(tmp_path / "missing.jsonl", rows)
    with pytest.raises(DataError, match=r"missing\.jsonl line 2: missing field 'output'"):
        _data(bad)
    with pytest.raises(DataError, match=r"broken\.jsonl line 2: invalid JSON"):
        _data(write_jsonl(tmp_path / "broken.jsonl", [repeat_rows(1)[0], "{oops"]))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        _data(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=r"cannot tell the format"):
        _data(write_jsonl(tmp_path / "odd.jsonl", [{"question": "x", "answer": "y"}]))
    no_reply = write_jsonl(tmp_path / "noreply.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"noreply\.jsonl line 1: the conversation has no assistant turn"):
        _data(no_reply).connect(_tok(tiny_lms))
    with pytest.raises(DataError, match=r"unknown role 'narrator'"):
        _data(write_jsonl(tmp_path / "role.jsonl", [{"messages": [{"role": "narrator", "content": "x"}]}]))


def test_a_template_that_drops_the_reply_is_refused(tmp_path, tiny_lms):
    tok = _tok(tiny_lms)
    tok.chat_template = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    dm = _data(write_jsonl(tmp_path / "a.jsonl", repeat_rows(2)))
    with pytest.raises(DataError, match=r"a\.jsonl line 1: the chat template drops the assistant's text"):
        dm.connect(tok)


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path, tiny_lms, policy):
    rows = repeat_rows(4)
    rows[2]["output"] = " ".join(["apple"] * 80)
    dm = _data(write_jsonl(tmp_path / "long.jsonl", rows), max_length=40, overlong=policy)
    dm.connect(_tok(tiny_lms))
    stats = dm.stats["train"]
    assert stats["samples"] == 4 and stats[{"truncate": "truncated", "drop": "dropped"}[policy]] == 1
    assert len(dm.tokenized["train"]) == (4 if policy == "truncate" else 3)
    assert max(len(x) for x in dm.tokenized["train"]) <= 40


def test_sources_mix_with_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    dm = TextData(sources=[TextSource(str(a), weight=2.0), TextSource(str(b), weight=0.5)])
    dm.setup("fit")
    texts = [s.text for s in dm.samples["train"]]
    assert sum(t.startswith("a") for t in texts) == 20 and sum(t.startswith("b") for t in texts) == 5
    assert len({t for t in texts if t.startswith("b")}) == 5


# ---- the CLI, end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fit_test_predict_export_through_the_cli(tmp_path, tiny_lms, repeat_data, kind):
    runs = tmp_path / "runs"
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Repeat the word three times.\n\nkiwi"},
                                                       {"messages": [{"role": "user", "content": "hi"}]}])
    cfg = sft_config(tmp_path / f"{kind}.yaml", tiny_lms[kind],
                     {"path": str(repeat_data["train"]), "val_path": str(repeat_data["val"]),
                      "test_path": str(repeat_data["val"])},
                     model_args={"generation": {"prompts": ["Repeat the word three times.\n\nfig"], "max_new_tokens": 8}},
                     trainer={"max_epochs": 3})
    run_cli("validate", "--config", cfg, "--runs_dir", runs, "--run_name", "before")
    before = json.loads((runs / "before/version_0/metrics.json").read_text())["validate"]["metrics"]["val/loss"]
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = runs / kind / "version_0"
    summary = json.loads((run / "metrics.json").read_text())
    after = summary["fit"]["metrics"]["val/loss"]
    print("val loss before/after", before, after)
    assert after < 0.7 * before, (before, after)
    assert abs(summary["fit"]["metrics"]["val/perplexity"] - torch.tensor(after).exp().item()) < 1e-3 * after
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"]
    samples = sorted((run / "samples").glob("step_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(samples) == 3, samples
    assert "generation" in json.loads(samples[-1].read_text().splitlines()[0])
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["splits"]["train"]["samples"] == 64 and stats["splits"]["train"]["truncated"] == 0

    run_cli("test", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best")
    test = json.loads((run / "metrics.json").read_text())["test"]["metrics"]
    assert abs(test["test/loss"] - summary["fit"]["best_score"]) < 1e-4  # the val file is also the test file

    run_cli("predict", "--config", cfg, "--runs_dir", runs, "--ckpt_path", "best", "--data.init_args.predict_path", prompts)
    preds = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and all(isinstance(p["generation"], str) for p in preds)
    best = load_task(str(run / "checkpoints/best.ckpt"))
    assert [p["generation"] for p in preds] == best.generate([prompt_conversation(p["messages"]) for p in preds])

    out = tmp_path / "exported"
    run_cli("export", "--ckpt_path", run / "checkpoints/best.ckpt", "--out", out)
    _check_export(out, best)


def _check_export(out: Path, task) -> None:
    """Plain transformers loads the export, with the chat template, and computes what the task computed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and not list(out.glob("adapter_*")), "merged weights and a chat template expected"
    ids = tok.apply_chat_template([{"role": "user", "content": "Repeat the word three times.\n\nfig"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    task.eval()
    with torch.no_grad():
        expected = task({"input_ids": ids})
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


# ---- methods --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,gc", [("dora", True), ("none", False)])
def test_dora_and_full_fine_tuning_train(tmp_path, tiny_lms, repeat_data, method, gc):
    task = CausalLMTask(ModelSpec(name=str(tiny_lms["qwen2"])), AdapterSpec(method=method, r=4),
                        OptimizerSpec(lr=0.01 if method != "none" else 3e-3, warmup=0), MonitorSpec(early_stopping=False, save_best=False, save_last=False),
                        gradient_checkpointing=gc)
    dm = TextData(path=str(repeat_data["train"]), val_path=str(repeat_data["val"]), max_length=64, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_steps=24, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(task, datamodule=dm)
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < 0.7 * before, (before, after)
    assert task._raw().model.gradient_checkpointing is gc
    if method == "none":
        assert task.adapter_report.trainable == task.adapter_report.total
    else:
        assert any("lora_magnitude_vector" in n for n, _ in task.net.named_parameters())


def test_quantization_without_adapter_is_refused(tiny_lms):
    with pytest.raises(ConfigError, match="needs an adapter"):
        CausalLMTask(ModelSpec(name=str(tiny_lms["llama"]), quantization="nf4"), AdapterSpec(method="none"))


# ---- packing ----------------------------------------------------------------------------------------------------
def _per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Per-token losses of each labeled stretch, in order (one tensor per row)."""
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:],
                                               ignore_index=IGNORE, reduction="none")
    return [row[lab != IGNORE] for row, lab in zip(losses, labels[:, 1:])]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_batch_gives_the_same_per_token_loss_as_unpacked(tmp_path, tiny_lms, attn, kind):
    from mmtune.data.text import Collator, pack
    from mmtune.models.hf import load_causal_lm

    rows = repeat_rows(12, seed=3)
    for i, row in enumerate(rows):  # mixed lengths
        row["output"] = " ".join([row["input"]] * (1 + i % 5))
    dm = _data(write_jsonl(tmp_path / "mixed.jsonl", rows), max_length=96)
    dm.connect(_tok(tiny_lms, kind))
    items = dm.tokenized["train"]
    model = load_causal_lm(ModelSpec(name=str(tiny_lms[kind]), kwargs={"attn_implementation": attn})).eval()
    assert model.config._attn_implementation == attn
    bins = pack([len(x) for x in items], 96)
    assert len(bins) < len(items) / 2 and all(sum(len(items[i]) for i in b) <= 96 for b in bins)
    packed = Collator(dm.tokenizer.pad_token_id, packed=True)([[items[i] for i in b] for b in bins])
    assert "attention_mask" not in packed
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers does not look for packed samples
        got = torch.cat(_per_token_losses(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                                                use_cache=False).logits,
                                          packed["labels"]))
        padded = Collator(dm.tokenizer.pad_token_id)([[items[i]] for b in bins for i in b])
        expected = torch.cat(_per_token_losses(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                                     use_cache=False).logits,
                                               padded["labels"]))
        # the control: the same packed rows with positions running on across samples (attention crosses)
        running = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
        crossed = torch.cat(_per_token_losses(model(input_ids=packed["input_ids"], position_ids=running, use_cache=False).logits,
                                              packed["labels"]))
    assert got.shape == expected.shape and len(got) == sum(sum(l != IGNORE for l in x.labels[1:]) for x in items)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    assert not torch.allclose(crossed, expected, atol=1e-2)
    assert abs(got.mean() - expected.mean()) < 1e-5


def test_packed_training_through_the_task(tmp_path, tiny_lms, repeat_data):
    task = CausalLMTask(ModelSpec(name=str(tiny_lms["qwen2"])), AdapterSpec(method="lora", r=8),
                        OptimizerSpec(lr=0.01, warmup=0), MonitorSpec(early_stopping=False, save_best=False, save_last=False))
    dm = TextData(path=str(repeat_data["train"]), val_path=str(repeat_data["val"]), max_length=128, batch_size=2,
                  packing=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(task, datamodule=dm)
    rows = trainer.train_dataloader.dataset
    assert len(rows) < len(dm.tokenized["train"]) / 3  # 64 samples of ~25 tokens in rows of 128
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < 0.7 * before, (before, after)


def test_packing_refuses_attention_that_would_cross_samples(tmp_path, tiny_lms, repeat_data):
    task = CausalLMTask(ModelSpec(name=str(tiny_lms["qwen2"]), kwargs={"attn_implementation": "sdpa"}))
    task.check_packing_support(packing=True)
    task.configure_model()
    task._raw().config._attn_implementation = "paged_attention"
    with pytest.raises(ConfigError, match="packing"):
        task.check_packing_support(packing=True)


def test_unshuffled_training_keeps_the_file_order(tmp_path, tiny_lms):
    rows = repeat_rows(10, seed=4)
    dm = _data(write_jsonl(tmp_path / "ordered.jsonl", rows), shuffle=False, batch_size=4)
    dm.connect(_tok(tiny_lms))
    order = [i for _, i in dm.train_dataloader().sampler]
    assert order == list(range(10))
    shuffled = _data(write_jsonl(tmp_path / "ordered.jsonl", rows), batch_size=4)
    shuffled.connect(_tok(tiny_lms))
    assert sorted(i for _, i in shuffled.train_dataloader().sampler) == order != [i for _, i in shuffled.train_dataloader().sampler]


@pytest.mark.slow
def test_ddp_fit_matches_one_process_on_the_same_global_batch(tmp_path, tiny_lms):
    """Two CPU processes (DDP preset, 2 rows each) against one (4 rows) through `mmtune fit`, on answers
    of 1 to 8 words: the loss is the per-token mean over the global batch however the tokens fall
    between processes, so the logged losses and the trained weights agree."""
    from support.ddp_runs import assert_same_training, fit_with_ddp_preset

    rows = repeat_rows(24, seed=5)
    for i, row in enumerate(rows):
        row["output"] = " ".join([row["input"]] * (1 + (i * 5) % 8))
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", repeat_rows(8, seed=6))

    def fit(name: str, devices: int, batch_size: int) -> Path:
        cfg = sft_config(tmp_path / f"{name}.yaml", tiny_lms["qwen2"],
                         {"path": str(train), "val_path": str(val), "split": [1.0, 0.0, 0.0], "batch_size": batch_size},
                         trainer={"max_epochs": 1, "log_every_n_steps": 1})
        return fit_with_ddp_preset(cfg, tmp_path / "runs", name, devices)

    assert_same_training(fit("ddp", 2, 2), fit("one", 1, 4), steps=6)  # 24 rows, 4 a step


# ---- QLoRA ------------------------------------------------------------------------------------------------------
def test_qlora_trains_a_4bit_base_and_exports_merged_full_precision(tmp_path, tiny_lms, repeat_data):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    # the head trains in full beside the adapters: the export must keep it too, not only the LoRA weights
    task = CausalLMTask(ModelSpec(name=str(tiny_lms["llama"]), quantization="nf4"),
                        AdapterSpec(method="lora", r=8, parts={"head": "full"}),
                        OptimizerSpec(lr=0.02, warmup=0), MonitorSpec(early_stopping=False, save_best=False, save_last=False),
                        gradient_checkpointing=True)
    dm = TextData(path=str(repeat_data["train"]), val_path=str(repeat_data["val"]), max_length=64, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    import bitsandbytes as bnb

    linear4 = [n for n, m in task._raw().named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 14, linear4  # every projection of both blocks holds NF4 weights
    assert all(p.dtype == torch.uint8 for n, p in task._raw().named_parameters() if n.endswith("q_proj.base_layer.weight"))
    trainer.fit(task, datamodule=dm)
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    assert after < 0.7 * before, (before, after)

    out = task.export(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_lms["llama"])
    trained_head = task._raw().lm_head.weight.detach().float()
    assert torch.equal(merged.lm_head.weight, trained_head) and not torch.equal(base.lm_head.weight, trained_head)
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        total, count = token_loss(merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                      batch["labels"])
    # the merged full-precision model keeps what was learned (NF4 rounding of the base aside)
    assert float(total / count) < 0.8 * before, (float(total / count), before, after)


# ---- other families ---------------------------------------------------------------------------------------------
FAMILY_CONFIGS = {
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "phi": ("PhiConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=4)),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_other_families_adapt_train_and_export(tmp_path, tiny_lms, repeat_data, family):
    """Mistral, Gemma, GPT-2 (Conv1D projections), Phi and Phi-3 (fused projections) through the same
    path: LoRA on the default targets, a few packed steps, a merged export plain transformers loads."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lms["qwen2"])
    cls, kwargs = FAMILY_CONFIGS[family]
    cfg = getattr(transformers, cls)(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                     bos_token_id=tok.eos_token_id, initializer_range=0.2, **kwargs)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / family)
    tok.save_pretrained(tmp_path / family)
    task = CausalLMTask(ModelSpec(name=str(tmp_path / family)), AdapterSpec(method="lora", r=4),
                        OptimizerSpec(lr=0.01, warmup=0), MonitorSpec(early_stopping=False, save_best=False, save_last=False))
    dm = TextData(path=str(repeat_data["train"]), val_path=str(repeat_data["val"]), max_length=128, batch_size=4,
                  packing=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=1)
    before = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(task, datamodule=dm)
    after = trainer.validate(task, datamodule=dm, verbose=False)[0]["val/loss"]
    assert len(task.adapter_report.adapted) >= 2 * 3 and after < before, (task.adapter_report.adapted, before, after)
    out = task.export(str(tmp_path / f"{family}_merged"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok("Repeat the word three times.")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, task.eval()({"input_ids": ids}), atol=1e-4)
