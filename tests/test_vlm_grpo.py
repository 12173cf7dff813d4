"""GRPO for vision-language models on tiny VLMs built from configs: the rollout repeats each image prompt
per completion (shapes of ids, completion mask and advantages), the image reaches the log-probabilities,
the reference at step 0 is the policy, a few steps through the Trainer log a finite reward and change
only the trained weights, validation writes its samples, the checkpoint reloads; encoder-decoder
families are refused by name; on a toy task (name the image's colour) the mean reward rises."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from mmtune.data.vl_prompts import VisionPromptData
from mmtune.errors import ConfigError
from mmtune.tasks.common import load_task
from mmtune.tasks.grpo_rollout import build_rollout
from mmtune.tasks.vlm_grpo import VisionGRPOTask
from tests.support.tiny_vlms import make_images, tiny_vlm_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

COLOR = {"function": "exact_match", "kwargs": {"pattern": "([a-z]+)"}}  # the completion's last word is the answer


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vlm_grpo")
    return {family: tiny_vlm_dir(family, root) for family in ("qwen2_vl", "qwen2_5_vl", "llava", "idefics3", "blip",
                                                           "vision_encoder_decoder")}


def color_questions(root: Path, n: int, seed: int) -> Path:
    """A VQA manifest whose answer is the image's colour word."""
    questions = ("What color is it?", "What color is the shape in this image?")  # two lengths: left padding
    rows = [{"id": f"q{i}", "image": str(p), "question": questions[i % 2], "answer": p.stem.split("_")[1],
             "site": f"s{i % 2}"} for i, p in enumerate(make_images(n, root / "images", seed=seed))]
    path = root / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_task(model_dir: Path, lr: float = 0.02, rewards=(COLOR,), adapter: str = "lora", **grpo) -> VisionGRPOTask:
    parts = {"lora": {"method": "lora", "r": 8, "alpha": 16, "parts": {"projector": "frozen"}},
             "none": {"method": "none"}}[adapter]
    return VisionGRPOTask(model={"name": str(model_dir)}, adapter=parts,
                          optimizer={"lr": lr, "warmup": 0, "weight_decay": 0.0},
                          monitor={"metric": "val/reward", "mode": "max", "early_stopping": False},
                          grpo={"num_generations": 4, "max_new_tokens": 6, "beta": 0.1, **grpo}, rewards=list(rewards))


def first_batch(task: VisionGRPOTask, path: Path, batch_size: int = 2) -> dict:
    dm = VisionPromptData(path=str(path), split=(1.0, 0.0, 0.0), batch_size=batch_size, num_workers=0)
    dm.setup("fit")
    task.configure_model()
    dm.connect(task.encoding)
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("family,adapter", [("qwen2_vl", "lora"), ("qwen2_5_vl", "lora"), ("llava", "lora"),
                                            ("idefics3", "lora"), ("llava", "none")])
def test_the_rollout_repeats_each_image_prompt_per_completion(models, tmp_path, family, adapter):
    task = make_task(models[family], adapter=adapter)
    batch = first_batch(task, color_questions(tmp_path, 4, 0))
    assert batch["meta"][0]["answer"] in {"red", "green", "blue", "yellow"} and batch["meta"][0]["site"]
    torch.manual_seed(0)
    rollout = task.rollout(batch)
    n, width = 2 * 4, rollout.input_ids.shape[1]
    length = width - rollout.prompt_len
    assert rollout.input_ids.shape[0] == n and rollout.completion_mask.shape == (n, length) and 1 <= length <= 6
    assert rollout.attention_mask.shape == (n, width) and rollout.advantages.shape == (n,)
    assert rollout.rewards.shape == (n,) and set(rollout.scores) == {"exact_match"} and len(rollout.texts) == n
    image_ids = torch.tensor(sorted(task.encoding.image_ids))
    assert image_ids.numel() and not torch.isin(rollout.completion_ids, image_ids).any()  # never generated
    # advantages are normalised within each prompt's group of completions
    assert torch.allclose(rollout.advantages.view(2, 4).sum(1), torch.zeros(2), atol=1e-4)
    # the pixel inputs travel with the rollout, their per-token rows extended over the completion
    assert "pixel_values" in rollout.model_inputs
    assert (task._ref is None) == (adapter == "lora")  # LoRA: the base with adapters off; full: a frozen copy
    if family.startswith("qwen"):
        assert rollout.model_inputs["mm_token_type_ids"].shape == (n, width)
        assert not rollout.model_inputs["mm_token_type_ids"][:, rollout.prompt_len:].any()
    rows = rollout.rows(slice(None))
    task.eval()
    with torch.no_grad():
        terms = task.loss_terms(rows, rollout.prompt_len)
        assert terms["kl"].item() == pytest.approx(0.0, abs=1e-6)  # at the start the policy is the reference
        assert torch.isfinite(terms["loss"]) and terms["clip_ratio"].item() == 0
        # the completions' log-probabilities are taken with the image: other pixels give other values
        seen = task._policy_logps(task.net, rows, rollout.prompt_len)
        pixels = rows["model_inputs"]["pixel_values"]
        other = {**rows, "model_inputs": {**rows["model_inputs"], "pixel_values": pixels.flip(0) + 0.5}}
        assert not torch.allclose(seen, task._policy_logps(task.net, other, rollout.prompt_len))
        if not family.startswith("qwen"):  # one pixel row per completion: micro-batches are cut by row
            part = rollout.rows(slice(2, 5))
            assert torch.allclose(task._policy_logps(task.net, part, rollout.prompt_len), seen[2:5], atol=1e-5)
        else:  # Qwen2-VL packs every image's patches into one tensor
            with pytest.raises(ConfigError, match="micro_batch_size: 0"):
                rollout.rows(slice(0, 4))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "idefics3"])
def test_the_logp_pass_sees_what_generation_saw(models, tmp_path, family):
    """The completions' log-probabilities from one forward pass over prompt + completion equal those of
    the sampling steps (positions under left padding, multimodal rotary positions, image features)."""
    task = make_task(models[family])
    batch = first_batch(task, color_questions(tmp_path, 4, 0))
    inputs = task.prompt_inputs(batch, 2)
    prompt_ids, prompt_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
    assert not prompt_mask.all()  # the two questions differ in length
    stops = task.encoding.stop_ids
    task.net.eval()
    with torch.no_grad():
        out = task.net.generate(input_ids=prompt_ids.clone(), attention_mask=prompt_mask, **inputs, max_new_tokens=5,
                                do_sample=False, eos_token_id=stops, pad_token_id=task.processor.tokenizer.pad_token_id,
                                suppress_tokens=sorted(task.encoding.image_ids), use_cache=True,
                                return_dict_in_generate=True, output_logits=True)
        rollout = build_rollout(prompt_ids, prompt_mask, out.sequences[:, prompt_ids.shape[1]:], stops,
                                task.processor.tokenizer, inputs)
        rollout.advantages = torch.zeros(len(prompt_ids))
        want = torch.stack(out.logits, 1).float().log_softmax(-1).gather(2, rollout.completion_ids.unsqueeze(-1))[..., 0]
        got = task._policy_logps(task.net, rollout.rows(slice(None)), rollout.prompt_len)
    mask = rollout.completion_mask.bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-4), (got - want).abs().max()


def test_a_reward_model_reads_the_text_of_an_image_prompt(models, tmp_path):
    from mmtune.rewards.model import text_turns

    task = make_task(models["qwen2_vl"])
    prompt = first_batch(task, color_questions(tmp_path, 2, 0))["messages"][0]
    assert any(part["type"] == "image" for part in prompt[0]["content"])
    assert text_turns(prompt) == [{"role": "user", "content": "What color is it?"}]
    plain = [{"role": "user", "content": "2+2?"}]
    assert text_turns(plain) == plain


def test_encoder_decoder_families_are_refused_by_name(models):
    with pytest.raises(ConfigError, match="VisionGRPOTask works with llava, idefics3.*blip has no chat template"):
        make_task(models["blip"])
    with pytest.raises(ConfigError, match="vision_encoder_decoder is an encoder-decoder"):
        make_task(models["vision_encoder_decoder"])
    with pytest.raises(ConfigError, match="needs rewards"):
        VisionGRPOTask(model={"name": str(models["qwen2_vl"])})


def _fit(task, tmp_path, train: Path, val: Path, steps: int, seen: list) -> L.Trainer:
    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/reward"]))

    dm = VisionPromptData(path=str(train), val_path=str(val), split=(1.0, 0.0, 0.0), batch_size=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, default_root_dir=tmp_path, callbacks=[Record()],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        log_every_n_steps=1, logger=L.pytorch.loggers.CSVLogger(tmp_path))
    trainer.fit(task, datamodule=dm)
    return trainer


def test_a_few_steps_train_only_the_adapter_and_reload(models, tmp_path):
    train, val = color_questions(tmp_path / "train", 8, 0), color_questions(tmp_path / "val", 3, 1)
    task = make_task(models["qwen2_vl"], rewards=(COLOR, {"function": "length_penalty", "weight": 0.1,
                                                         "kwargs": {"target": 3}}))
    task.configure_model()
    before = {k: v.detach().clone() for k, v in task.net.named_parameters()}
    seen: list[float] = []
    trainer = _fit(task, tmp_path, train, val, 3, seen)
    assert len(seen) == 3 and all(math.isfinite(r) for r in seen)
    changed = {k for k, v in task.net.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert changed and all("lora_" in k for k in changed)  # the base, the vision tower, the projector stay
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/kl", "train/clip_ratio", "train/completion_length", "train/reward/exact_match",
            "train/reward/length_penalty", "val/reward", "val/reward/exact_match"} <= set(metrics)
    run = Path(trainer.log_dir)
    line = json.loads((run / "samples" / "val_step_3.jsonl").read_text().splitlines()[0])
    assert {"origin", "messages", "completion", "reward", "rewards", "tokens"} <= set(line)
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    loaded = load_task(str(ckpt))
    assert isinstance(loaded, VisionGRPOTask) and loaded.grpo_spec.num_generations == 4
    loaded.configure_model()
    state = dict(loaded.net.named_parameters())
    assert all(torch.equal(state[k].detach(), v.detach()) for k, v in task.net.named_parameters() if k in changed)


@pytest.mark.slow
def test_vlm_grpo_raises_the_mean_reward_of_naming_the_colour(models, tmp_path):
    train, val = color_questions(tmp_path / "train", 16, 0), color_questions(tmp_path / "val", 4, 1)
    # names the colour anywhere in the answer: 1, else 0 (the tests' `support.grpo_rewards`)
    L.seed_everything(0)  # the LoRA init, whichever tests ran before (seeds 0, 1, 2: 0 -> 0.5, 0.01 -> 0.29, 0.03 -> 0.3)
    task = make_task(models["qwen2_vl"], lr=0.05, beta=0.0, num_generations=8, max_new_tokens=4,
                     rewards=({"function": "support.grpo_rewards:echoes_answer"},))
    seen: list[float] = []
    _fit(task, tmp_path, train, val, 60, seen)
    first, last = sum(seen[:10]) / 10, sum(seen[-10:]) / 10
    print("train reward", first, "->", last)
    assert last > first + 0.2


@pytest.mark.slow
def test_vlm_grpo_resumes_mid_epoch_exactly_through_the_cli_and_exports(models, tmp_path):
    import yaml
    from test_resume import kill_and_resume
    from transformers import AutoModelForImageTextToText

    from conftest import run_cli

    train, val = color_questions(tmp_path / "train", 8, 0), color_questions(tmp_path / "val", 2, 1)
    config = tmp_path / "vlm_grpo.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "VisionGRPOTask", "init_args": {
            "model": {"name": str(models["qwen2_vl"])}, "adapter": {"method": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            "optimizer": {"lr": 0.02, "warmup": 0.2, "weight_decay": 0.0},
            "grpo": {"num_generations": 4, "max_new_tokens": 4, "beta": 0.04}, "rewards": [COLOR],
            "monitor": {"metric": "val/reward", "mode": "max", "early_stopping": False, "save_last_every_n_steps": 2}}},
        "data": {"class_path": "VisionPromptData", "init_args": {"path": str(train), "val_path": str(val),
                                                                "batch_size": 2, "num_workers": 0}},
        "trainer": {"accelerator": "cpu", "max_epochs": 3, "enable_progress_bar": False, "enable_model_summary": False,
                    "log_every_n_steps": 1},
    }))
    # 4 steps an epoch: killed at epoch 1 batch 3, last saved at step 6 (epoch 1, batch 2)
    run = kill_and_resume(tmp_path, config, epoch=1, batch=3, saved_step=6, last_epoch=2)
    assert (run / "samples" / "val_step_12.jsonl").is_file()
    run_cli("export", "--ckpt_path", run / "checkpoints" / "best.ckpt", "--out", tmp_path / "merged")
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "merged") is not None
