"""PEFT methods beyond LoRA on tiny models: prefix and prompt tuning train, save small checkpoints,
reload with equal outputs and export as adapters with a loading note; PiSSA and OLoRA leave the outputs
unchanged at step 0 (peft moves the principal part out of the base weights) and reload exactly; LoftQ
starts; LoRA+ gives the B matrices their own optimizer groups at the scaled rate; VeRA trains, reloads
and merges; a method that cannot apply to a model is an error naming those that can."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import run_cli
from support.text import build_model, repeat_rows, sft_config, write_jsonl
from mmtune.adapters import apply_adapter
from mmtune.data.text import TextData, prompt_conversation
from mmtune.errors import ConfigError
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec
from mmtune.tasks.common import load_task
from mmtune.tasks.sft import CausalLMTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    return build_model("qwen2", tmp_path_factory.mktemp("peft_lm"))


@pytest.fixture(scope="module")
def repeat_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft_data")
    return {"train": write_jsonl(root / "train.jsonl", repeat_rows(48, 0)),
            "val": write_jsonl(root / "val.jsonl", repeat_rows(16, 1))}


def _batch(task: CausalLMTask, repeat_data) -> dict:
    dm = TextData(path=str(repeat_data["val"]), split=(1.0, 0.0, 0.0), max_length=64, batch_size=4)
    dm.setup("fit")
    dm.connect(task.tokenizer)
    return next(iter(dm.train_dataloader()))


def _logits(task: CausalLMTask, batch: dict) -> torch.Tensor:
    task.eval()
    with torch.no_grad():
        return task(batch)


def _fit_through_the_cli(tmp_path, qwen2, repeat_data, adapter: dict, steps: int = 12, lr: float = 0.01) -> Path:
    runs = tmp_path / "runs"
    cfg = sft_config(tmp_path / f"{adapter['method']}.yaml", qwen2,
                     {"path": str(repeat_data["train"]), "val_path": str(repeat_data["val"])},
                     model_args={"adapter": adapter, "optimizer": {"lr": lr, "warmup": 0, "weight_decay": 0.0}},
                     trainer={"max_steps": steps, "max_epochs": 10})
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    return runs / cfg.stem / "version_0"


def _val_losses(run: Path) -> list[float]:
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    col = rows[0].index("val/loss")
    return [float(r[col]) for r in rows[1:] if r[col]]


# ---- prefix and prompt tuning ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_tuning_train_save_reload_and_export(tmp_path, qwen2, repeat_data, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    start = CausalLMTask(ModelSpec(name=str(qwen2)), AdapterSpec(method=method, num_virtual_tokens=4))
    start.configure_model()
    batch = _batch(start, repeat_data)
    before = torch.nn.functional.cross_entropy(_logits(start, batch)[:, :-1].transpose(1, 2), batch["labels"][:, 1:])
    assert {n for n, p in start.net.named_parameters() if p.requires_grad} == {"prompt_encoder.default.embedding.weight"}

    run = _fit_through_the_cli(tmp_path, qwen2, repeat_data, {"method": method, "num_virtual_tokens": 4}, steps=18,
                               lr=0.3)
    ckpt = run / "checkpoints/last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert list(saved) == ["net.prompt_encoder.default.embedding.weight"]  # a small checkpoint: the virtual tokens
    task = load_task(str(ckpt))
    trained = _logits(task, batch)
    after = torch.nn.functional.cross_entropy(trained[:, :-1].transpose(1, 2), batch["labels"][:, 1:])
    print(method, before.item(), after.item())
    assert after < 0.8 * before  # it trained
    assert torch.equal(trained, _logits(load_task(str(ckpt)), batch))  # reloads to the same outputs

    out = tmp_path / "export"
    run_cli("export", "--ckpt_path", ckpt, "--out", out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    note = (out / "LOADING.md").read_text()
    assert "PeftModel.from_pretrained" in note and str(qwen2) in note
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen2), out).eval()  # what the note says
    with torch.no_grad():
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got[:, -batch["input_ids"].shape[1]:], trained, atol=1e-5)
    assert len(task.generate([prompt_conversation("hi")])) == 1  # peft generates with the virtual tokens


def test_prompt_learning_refuses_packing_and_models_it_cannot_apply_to(qwen2, tiny_models):
    import timm

    with pytest.raises(ConfigError, match="packing does not work with adapter.method 'prefix'"):
        CausalLMTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="prefix")).check_packing_support(True)
    cnn = timm.create_model("test_resnet", num_classes=3)
    for method in ("prefix", "prompt"):
        with pytest.raises(ConfigError, match=rf"'{method}' .* does not apply to this model .*methods that do: none, "
                                              r"lora, dora, ia3, loha, lokr, vera$"):
            apply_adapter(cnn, AdapterSpec(method=method), "timm", {"backbone": None, "head": ["fc"]},
                          {"backbone": "adapter", "head": "full"})
    with pytest.raises(ConfigError, match="'vera' adapts linear layers only.*Conv2d"):
        apply_adapter(cnn, AdapterSpec(method="vera"), "timm", {"backbone": None, "head": ["fc"]},
                      {"backbone": "adapter", "head": "full"})


# ---- LoRA initializations ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_lora_inits_leave_outputs_unchanged_at_step_zero(qwen2, repeat_data, init):
    plain = CausalLMTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="none"))
    plain.configure_model()
    batch = _batch(plain, repeat_data)
    task = CausalLMTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", r=4, init=init))
    task.configure_model()
    q_proj = task._raw().model.layers[0].self_attn.q_proj
    base_changed = not torch.equal(q_proj.base_layer.weight, plain.net.model.layers[0].self_attn.q_proj.weight)
    assert base_changed == (init in ("pissa", "olora"))  # peft moved the principal part into A and B
    assert q_proj.lora_B["default"].weight.abs().sum() > 0 or init == "gaussian"
    assert torch.allclose(_logits(task, batch), _logits(plain, batch), atol=1e-4)


def test_pissa_trains_saves_reloads_and_merges(tmp_path, qwen2, repeat_data):
    from transformers import AutoModelForCausalLM

    run = _fit_through_the_cli(tmp_path, qwen2, repeat_data, {"method": "lora", "r": 4, "init": "pissa"}, lr=0.005)
    losses = _val_losses(run)
    assert losses[-1] < losses[0]
    ckpt = run / "checkpoints/last.ckpt"
    assert all("lora_" in k for k in torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    task = load_task(str(ckpt))  # rebuilds the base, redoes the (deterministic) PiSSA split, loads A and B
    batch = _batch(task, repeat_data)
    trained = _logits(task, batch)
    assert torch.equal(trained, _logits(load_task(str(ckpt)), batch))
    run_cli("export", "--ckpt_path", ckpt, "--out", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, trained, atol=1e-4)


def test_loftq_needs_a_gpu_and_says_so(qwen2):
    with pytest.raises(ConfigError, match="loftq_bits must be 4 or 8"):  # checked with or without a GPU
        AdapterSpec(method="lora", init="loftq", loftq_bits=2)
    task = CausalLMTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", r=4, init="loftq", loftq_bits=4))
    if torch.cuda.is_available():  # the refusal below cannot happen there; the GPU test runs LoftQ instead
        pytest.skip("a GPU is present: test_loftq_starts_from_a_quantization_aware_split covers it")
    with pytest.raises(ConfigError, match="init 'loftq' needs a CUDA or XPU GPU"):
        task.configure_model()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="peft computes LoftQ on a CUDA device")
def test_loftq_starts_from_a_quantization_aware_split(qwen2):
    plain = CausalLMTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="none"))
    plain.configure_model()
    task = CausalLMTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", r=4, init="loftq", loftq_bits=4))
    task.configure_model()
    layer = task._raw().model.layers[0].self_attn.q_proj
    original = plain.net.model.layers[0].self_attn.q_proj.weight
    base = layer.base_layer.weight
    update = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    # the base holds quantized weights and A, B the part quantization lost: together closer than the base alone
    assert (base + update - original).norm() < (base - original).norm()
    assert not torch.equal(base, original)


def test_reference_based_preference_losses_refuse_inits_that_rewrite_the_base(qwen2):
    from mmtune import DPOTask, PreferenceSpec

    with pytest.raises(ConfigError, match="init 'pissa' rewrites the base weights.*orpo, simpo"):
        DPOTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", init="pissa"), preference=PreferenceSpec(loss="dpo"))
    DPOTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", init="pissa"), preference=PreferenceSpec(loss="simpo"))
    with pytest.raises(ConfigError, match="LoRA initialization"):
        AdapterSpec(method="ia3", init="pissa")
    with pytest.raises(ConfigError, match="rewrites the base weights, which a quantized base"):
        CausalLMTask(ModelSpec(name=str(qwen2), quantization="nf4"), AdapterSpec(method="lora", init="olora"))


# ---- LoRA+ -----------------------------------------------------------------------------------------------------

def test_lora_plus_puts_b_matrices_in_their_own_groups_at_the_scaled_rate(qwen2, tmp_path):
    task = CausalLMTask(ModelSpec(name=str(qwen2)), AdapterSpec(method="lora", r=4, lora_plus_ratio=16, parts={"embeddings": "full"}),
                        OptimizerSpec(lr=1e-3, weight_decay=0.1, warmup=0, part_lrs={"embeddings": 1e-4}))
    task.configure_model()
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False, default_root_dir=tmp_path)
    task.trainer = trainer
    optimizer = task.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in task._raw().named_parameters()}
    by_lr: dict[float, set[str]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_lr.setdefault(group["lr"], set()).add(names[id(p)])
    b = {n for n in names.values() if ".lora_B." in n}
    a = {n for n in names.values() if ".lora_A." in n}
    assert b and by_lr[1e-3 * 16] == b  # every B matrix, and only they, at lr * ratio
    assert a <= by_lr[1e-3] and not b & by_lr[1e-3]
    assert by_lr[1e-4] == {"model.embed_tokens.weight"}  # part rates still apply
    with pytest.raises(ConfigError, match="lora_plus_ratio needs adapter.method lora or dora"):
        AdapterSpec(method="vera", lora_plus_ratio=4)


# ---- VeRA ------------------------------------------------------------------------------------------------------

def test_vera_trains_saves_reloads_and_merges(tmp_path, qwen2, repeat_data):
    from transformers import AutoModelForCausalLM

    run = _fit_through_the_cli(tmp_path, qwen2, repeat_data, {"method": "vera", "r": 32}, steps=18, lr=0.05)
    losses = _val_losses(run)
    assert losses[-1] < losses[0], losses
    ckpt = run / "checkpoints/last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all("vera_" in k for k in saved) and any("vera_lambda_b" in k for k in saved)
    task = load_task(str(ckpt))
    batch = _batch(task, repeat_data)
    trained = _logits(task, batch)
    assert torch.equal(trained, _logits(load_task(str(ckpt)), batch))
    run_cli("export", "--ckpt_path", ckpt, "--out", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, trained, atol=1e-4)
