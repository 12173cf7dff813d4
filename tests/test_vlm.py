"""Vision-language fine-tuning on tiny models of every supported family, built from configs and
loaded through the same path as a user's checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

from mmtune.data.text import IGNORE
from mmtune.data.vl_data import VisionTextData, VisualCollate
from mmtune.errors import DataError
from mmtune.tasks.common import load_task
from mmtune.tasks.vlm import VisionLanguageTask
from tests.support.tiny_vlms import FAMILIES, caption_rows, make_images, tiny_vlm_dir


@pytest.fixture(scope="session")
def vlm_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vlms")


@pytest.fixture(scope="session")
def caption_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("captions")
    path = root / "captions.jsonl"
    with path.open("w") as f:
        for i, (image, text) in enumerate(caption_rows(24, root / "images")):
            f.write(json.dumps({"id": f"c{i}", "image": str(image), "text": text, "group": f"p{i % 6}"}) + "\n")
    return path


def _task(model_dir: Path, **kwargs) -> VisionLanguageTask:
    defaults = dict(adapter={"method": "lora", "r": 8, "alpha": 16},
                    optimizer={"lr": 5e-3, "weight_decay": 0.0, "warmup": 0},
                    decoding={"max_new_tokens": 4}, monitor={"early_stopping": False})
    return VisionLanguageTask(model={"name": str(model_dir)}, **{**defaults, **kwargs})


def _data(path: Path, **kwargs) -> VisionTextData:
    return VisionTextData(path=str(path), **{"batch_size": 4, "num_workers": 0, "prompt": "What is shown?", **kwargs})


def _trainer(root: Path, **kwargs) -> L.Trainer:
    return L.Trainer(**{"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "default_root_dir": str(root), **kwargs})


def _connected(task: VisionLanguageTask, dm: VisionTextData) -> VisionTextData:
    dm.setup("fit")
    dm.connect(task.encoding)
    task.configure_model()
    return dm


def _first_batch(dm: VisionTextData, split: str = "train", n: int = 4) -> dict:
    dataset = dm._dataset(split)
    return VisualCollate(dm.encoding, dm.max_length, with_prompts=True)([dataset[i] for i in range(n)])


def _logits(task: VisionLanguageTask, batch: dict) -> torch.Tensor:
    task.eval()
    with torch.no_grad():
        inputs = task._inputs(batch["inputs"])
        if task._raw().config.is_encoder_decoder:
            inputs["decoder_input_ids"] = task._raw().prepare_decoder_input_ids_from_labels(batch["labels"])
        return task.net(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_family_learns_generates_checkpoints_and_exports(family, vlm_root, caption_file, tmp_path):
    torch.manual_seed(0)
    model_dir = tiny_vlm_dir(family, vlm_root)
    task = _task(model_dir)
    dm = _connected(task, _data(caption_file))
    batch = _first_batch(dm)
    labeled = batch["labels"] != IGNORE
    assert labeled.any()
    if not task._raw().config.is_encoder_decoder:  # prompt and image tokens carry no loss
        assert not labeled[:, : labeled.shape[1] // 2].any()

    # a few steps on one fixed batch lower its loss
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-3)
    task.train()
    losses = []
    for _ in range(12):
        total, count = task.loss_sums(batch)
        loss = total / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    texts = task.generate_batch(batch["prompt_inputs"])
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)

    # a Lightning checkpoint (adapters and trained parts only) reloads to the same outputs
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    ckpt = tmp_path / "task.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["mmtune_weights"] == "trainable"
    reloaded = load_task(str(ckpt))
    reloaded.configure_model() if reloaded.net is None else None
    want = _logits(task, batch)
    assert torch.allclose(_logits(reloaded, batch), want, atol=1e-5)

    # the merged export loads with plain transformers and gives the same outputs
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = task.export(str(tmp_path / "export"))
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    AutoProcessor.from_pretrained(out)
    inputs = task._inputs(batch["inputs"])
    if plain.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = plain.prepare_decoder_input_ids_from_labels(batch["labels"])
    with torch.no_grad():
        got = plain(**inputs).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_fully_trained_vision_tower_and_projector_survive_the_merge(vlm_root, caption_file, tmp_path):
    from transformers import AutoModelForImageTextToText

    task = _task(tiny_vlm_dir("llava", vlm_root), adapter={"method": "lora", "parts": {"vision": "full", "projector": "full"}},
                 optimizer={"lr": 1e-2, "vision_lr": 5e-3, "projector_lr": 2e-2, "warmup": 0})
    dm = _connected(task, _data(caption_file))
    before = {n: p.detach().clone() for n, p in task._raw().named_parameters() if "vision_tower" in n}
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(task, datamodule=dm)
    assert {g["initial_lr"] for g in task.trainer.optimizers[0].param_groups} == {1e-2, 5e-3, 2e-2}
    changed = [n for n, p in task._raw().named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "the vision tower did not train"
    out = task.export(str(tmp_path / "export"))
    plain = AutoModelForImageTextToText.from_pretrained(out)
    trained = dict(task._raw().named_parameters())
    exported = dict(plain.named_parameters())
    name = changed[0]
    assert torch.equal(exported[name], trained[name].detach())


def test_multi_turn_chat_labels_only_assistant_turns(vlm_root, tmp_path):
    images = make_images(2, tmp_path / "img")
    rows = [{"id": "chat1", "images": [str(images[0]), str(images[1])], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nCompare them."}, {"from": "gpt", "value": "red and blue"},
        {"from": "human", "value": "Which is red?"}, {"from": "gpt", "value": "the first"}]}] * 4
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for family in ("llava", "qwen2_vl", "idefics3"):
        task = _task(tiny_vlm_dir(family, vlm_root))
        dm = _data(path, split=(1.0, 0.0, 0.0))
        dm.setup("fit")
        dm.connect(task.encoding)
        batch = _first_batch(dm, n=1)
        tok = task.processor.tokenizer
        labels = batch["labels"][0]
        text = tok.decode(labels[labels != IGNORE], skip_special_tokens=True)
        assert "red and blue" in text and "the first" in text, (family, text)
        assert "Compare" not in text and "Which" not in text, (family, text)
        image_id = tok.convert_tokens_to_ids(task.processor.image_token)
        ids = batch["inputs"]["input_ids"][0]
        assert int((ids == image_id).sum()) > 2  # both images expanded
        assert not (labels == image_id).any()


def test_mixed_image_counts_build_one_batch(vlm_root, tmp_path):
    images = make_images(3, tmp_path / "img")
    rows = [{"id": "none", "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
            {"id": "one", "image": str(images[0]), "messages": [{"role": "user", "content": "<image>What?"},
                                                                {"role": "assistant", "content": "a shape"}]},
            {"id": "two", "images": [str(images[1]), str(images[2])],
             "messages": [{"role": "user", "content": "<image><image>Both?"}, {"role": "assistant", "content": "two"}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for family in ("llava", "qwen2_vl", "idefics3"):
        task = _task(tiny_vlm_dir(family, vlm_root))
        dm = _data(path, split=(1.0, 0.0, 0.0))
        dm.setup("fit")
        dm.connect(task.encoding)
        task.configure_model()
        batch = _first_batch(dm, n=3)
        total, count = task.loss_sums(batch)
        assert torch.isfinite(total) and count > 0


def test_bad_samples_are_named_or_skipped_and_counted(vlm_root, tmp_path):
    images = make_images(2, tmp_path / "img")
    cmyk = tmp_path / "img" / "cmyk.jpg"
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(cmyk)
    deep = tmp_path / "img" / "deep.png"
    Image.new("I;16", (32, 32), 4000).save(deep)
    good = [{"id": f"g{i}", "image": str(p), "question": "What?", "answer": "a shape"}
            for i, p in enumerate([images[0], images[1], cmyk, deep])]
    bad = [{"id": "no-file", "image": str(tmp_path / "missing.png"), "question": "What?", "answer": "x"},
           {"id": "no-answer", "image": str(images[0]), "question": "What?"},
           {"id": "placeholders", "image": str(images[0]), "question": "<image><image>Which?", "answer": "x"}]
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    with pytest.raises(DataError, match="sample no-answer: answer field"):
        _data(path).setup("fit")
    dm = _data(path, bad_samples="skip", split=(1.0, 0.0, 0.0))
    dm.setup("fit")
    assert sorted(dm.skipped) == ["no-answer", "no-file", "placeholders"]
    reasons = " | ".join(dm.skipped.values())
    assert "image not found" in reasons and "answer field" in reasons and "2 image placeholder(s) but 1 image(s)" in reasons
    task = _task(tiny_vlm_dir("llava", vlm_root))
    dm.connect(task.encoding)
    batch = _first_batch(dm, n=4)  # CMYK and 16-bit images load as RGB
    assert batch["inputs"]["pixel_values"].shape[0] == 4


def test_vqa_run_reports_accuracy_by_answer_type_and_writes_predictions(vlm_root, tmp_path):
    images = make_images(12, tmp_path / "img")
    rows = [{"id": f"q{i}", "image": str(p), "question": "Is it red?" if i % 2 else "What is it?",
             "answer": ["yes", "Yes."] if i % 2 else "a shape", "answer_type": "closed" if i % 2 else "open",
             "split": "train" if i < 8 else "test"} for i, p in enumerate(images)]
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = _task(tiny_vlm_dir("qwen2_vl", vlm_root), predictions_file=str(tmp_path / "preds.jsonl"))
    dm = _data(path)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    metrics = trainer.test(task, datamodule=dm)[0]
    assert {"test/loss", "test/bleu4", "test/rougeL", "test/chrf", "test/vqa_acc", "test/vqa_acc_closed",
            "test/vqa_acc_open"} <= set(metrics)
    written = [json.loads(line) for line in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in written) == ["q10", "q11", "q8", "q9"]
    assert {"id", "reference", "prediction"} <= set(written[0])


def test_stratified_sample_is_seeded_and_keeps_every_type_and_the_mix():
    from mmtune.data.samplers import stratified_sample

    types = ["closed"] * 60 + ["open"] * 30 + [None] * 10
    picked = stratified_sample(types, 20, seed=3)
    assert picked == stratified_sample(types, 20, seed=3) and picked != stratified_sample(types, 20, seed=4)
    counts = [[types[i] for i in picked].count(t) for t in ("closed", "open", None)]
    assert counts == [12, 6, 2]  # the data's mix
    rare = ["closed"] * 99 + ["open"]
    assert sorted(rare[i] for i in stratified_sample(rare, 5, seed=0)) == ["closed"] * 4 + ["open"]  # though 0.05 is its share
    assert len({types[i] for i in stratified_sample(types, 2, seed=0)}) == 2  # fewer than the types: the largest, one each
    assert stratified_sample(types, 0, seed=0) == [] and stratified_sample(types, 500, seed=0) == list(range(100))


def test_validation_generates_for_a_fixed_sample_spread_over_answer_types(vlm_root, tmp_path):
    images = make_images(12, tmp_path / "img")
    kinds = ["closed", "open"] * 2 + ["closed"] * 6 + ["open"] * 2  # 4 training rows, then 8 validation rows
    rows = [{"id": f"q{i}", "image": str(p), "question": "Is it red?" if kind == "closed" else "What is it?",
             "answer": "yes" if kind == "closed" else "a shape", "answer_type": kind, "split": "train" if i < 4 else "val"}
            for i, (p, kind) in enumerate(zip(images, kinds))]
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = _task(tiny_vlm_dir("qwen2_vl", vlm_root), decoding={"max_new_tokens": 4, "val_samples": 3})
    dm = _data(path)  # batches of 4: the first validation batch is all closed questions
    trainer = _trainer(tmp_path)

    def generated() -> tuple[dict, list[dict]]:
        metrics = trainer.validate(task, datamodule=dm, verbose=False)[0]
        written = (tmp_path / "predictions" / f"val_step_{trainer.global_step}.jsonl").read_text().splitlines()
        return metrics, [json.loads(line) for line in written]

    metrics, first = generated()
    assert len(first) == 3 and {r["answer_type"] for r in first} == {"closed", "open"}
    assert {"val/vqa_acc_closed", "val/vqa_acc_open"} <= set(metrics)
    _, second = generated()
    assert sorted(r["id"] for r in second) == sorted(r["id"] for r in first)


@pytest.mark.slow
def test_ddp_with_text_only_and_multi_image_batches_does_not_hang(vlm_root, tmp_path):
    """Two CPU processes, one sample per step: at some step one process has no image while the other has
    two. The projector trains fully and the vision tower has LoRA, so a process whose batch skips them
    must still produce their (zero) gradients, or DDP waits forever."""
    import os
    import subprocess
    import sys

    import yaml

    from mmtune.data.samplers import EpochSampler

    images = make_images(4, tmp_path / "img")
    rows = []
    for i in range(8):
        k = (0, 1, 2, 0)[i % 4]
        rows.append({"id": f"s{i}", "images": [str(p) for p in images[:k]], "split": "train" if i < 8 else "val",
                     "messages": [{"role": "user", "content": "<image>" * k + "What do you see?"},
                                  {"role": "assistant", "content": f"{k} images"}]})
    rows += [dict(r, id=f"v{j}", split="val") for j, r in enumerate(rows[:2])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    per_rank = [[i for _, i in EpochSampler(8, 42, None, 2, rank)] for rank in range(2)]
    steps = list(zip(*per_rank))
    assert any((rows[a]["images"] == []) != (rows[b]["images"] == []) for a, b in steps), steps  # precondition

    config = {"model": {"class_path": "VisionLanguageTask", "init_args": {
                  "model": {"name": str(tiny_vlm_dir("llava", vlm_root))},
                  "adapter": {"method": "lora", "r": 4, "parts": {"vision": "adapter", "projector": "full"}},
                  "optimizer": {"lr": 1e-3}, "decoding": {"max_new_tokens": 3}}},
              "data": {"class_path": "VisionTextData", "init_args": {
                  "path": str(path), "batch_size": 1, "num_workers": 0}},
              "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 1,
                          "enable_progress_bar": False}}
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "mmtune", "fit", "--config", str(cfg), "--runs_dir",
                           str(tmp_path / "runs"), "--run_name", "ddp"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "runs" / "ddp" / "version_0" / "metrics.json").read_text())
    assert summary["fit"]["global_step"] == 4


def test_truncation_is_counted_and_never_cuts_image_tokens(vlm_root, caption_file):
    task = _task(tiny_vlm_dir("llava", vlm_root))
    dm = _connected(task, _data(caption_file, max_length=30))  # 16 image tokens + prompt; the caption is cut
    batch = _first_batch(dm)
    assert batch["truncated"] == 4 and batch["inputs"]["input_ids"].shape[1] == 30
    dm = _connected(task, _data(caption_file, max_length=10))
    with pytest.raises(DataError, match="would cut through its image tokens"):
        _first_batch(dm)


@pytest.mark.parametrize("options", [{"gradient_checkpointing": True}, {"precision": "bf16-mixed"}],
                         ids=["gradient_checkpointing", "bf16_mixed"])
def test_memory_options_train(options, vlm_root, caption_file, tmp_path):
    precision = options.pop("precision", "32-true")
    task = _task(tiny_vlm_dir("qwen2_vl", vlm_root), **options)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=1, num_sanity_val_steps=0, precision=precision)
    trainer.fit(task, datamodule=_data(caption_file))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    if options.get("gradient_checkpointing"):
        assert task._raw().is_gradient_checkpointing


def test_training_runs_in_train_mode(vlm_root, caption_file, tmp_path):
    """from_pretrained returns a model in eval mode; adapter and model dropout must be active in fit."""
    task = _task(tiny_vlm_dir("llava", vlm_root), adapter={"method": "lora", "dropout": 0.1})
    modes = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            modes.append(all(m.training for m in module.net.modules()))

    _trainer(tmp_path, max_steps=2, limit_val_batches=1, callbacks=[Probe()]).fit(task, datamodule=_data(caption_file))
    assert modes == [True, True]


def test_an_answer_that_tokenizes_to_nothing_is_named_or_skipped(vlm_root, tmp_path):
    """BLIP's BERT normalizer deletes zero-width characters: such an answer leaves nothing to learn."""
    images = make_images(3, tmp_path / "img")
    rows = [{"id": f"ok{i}", "image": str(p), "question": "What?", "answer": "a shape"} for i, p in enumerate(images)]
    rows.append({"id": "invisible", "image": str(images[0]), "question": "What?", "answer": "\u200b"})
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = _task(tiny_vlm_dir("blip", vlm_root))
    dm = _data(path, split=(1.0, 0.0, 0.0))
    dm.setup("fit")
    with pytest.raises(DataError, match="sample invisible: the answer tokenizes to nothing"):
        dm.connect(task.encoding)
    dm = _data(path, split=(1.0, 0.0, 0.0), bad_samples="skip")
    dm.setup("fit")
    dm.connect(task.encoding)
    assert list(dm.skipped) == ["invisible"] and len(dm.prepared["train"]) == 3
