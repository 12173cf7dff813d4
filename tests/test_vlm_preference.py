"""DPO (and the reference-free losses) for vision-language models on image + prompt + chosen/rejected rows,
on a tiny Qwen2-VL built from a config: the pair shares the image, the reference is the model with its
adapters off (the loss starts at log 2), the preference is learned through the CLI, records and the
merged export follow; bad rows are named. Prefix/prompt tuning of the VLM's language model trains,
reloads and exports as an adapter."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from mmtune.data.vl_preference import PairCollate, VisionPreferenceData
from mmtune.errors import ConfigError, DataError
from mmtune.losses.preference import sequence_logps
from mmtune.tasks.common import load_task
from mmtune.tasks.vlm import VisionLanguageTask
from mmtune.tasks.vlm_preference import VisionPreferenceTask
from tests.support.tiny_vlms import COLORS, SHAPES, make_images, tiny_vlm_dir

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.py

FAMILY = "qwen2_vl"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_vlm_dir(FAMILY, tmp_path_factory.mktemp("vlm_pref"))


def preference_file(root: Path, n: int, seed: int) -> Path:
    """The chosen reply names the image's color and shape; the rejected one another color."""
    rng = random.Random(seed)
    rows = []
    for i, image in enumerate(make_images(n, root / "images", seed=seed)):
        color, shape = image.stem.split("_")[1:]
        wrong = rng.choice([c for c in COLORS if c != color])
        rows.append({"id": f"p{i}", "image": str(image), "prompt": "What is shown?", "chosen": f"a {color} {shape}",
                     "rejected": f"a {wrong} {rng.choice(SHAPES)}", "site": f"s{i % 2}"})
    path = root / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_pairs_share_the_image_and_the_reference_is_the_base(model_dir, tmp_path):
    path = preference_file(tmp_path, 8, 0)
    task = VisionPreferenceTask(model={"name": str(model_dir)}, adapter={"method": "lora", "r": 4},
                                preference={"loss": "dpo", "beta": 0.5})
    dm = VisionPreferenceData(path=str(path), split=(1.0, 0.0, 0.0), batch_size=4, num_workers=0)
    dm.setup("fit")
    dm.connect(task.encoding)
    task.configure_model()
    dataset = dm._dataset("train")
    batch = PairCollate(dm.encoding, dm.max_length)([dataset[i] for i in range(4)])
    ids = batch["inputs"]["input_ids"]
    assert len(ids) == 8 and batch["origins"] == ["p0", "p1", "p2", "p3"] and batch["meta"][0]["site"] == "s0"
    pixels = batch["inputs"]["pixel_values"]
    half = len(pixels) // 2
    assert torch.equal(pixels[:half], pixels[half:])  # the rejected rows see the same images
    task.eval()
    with torch.no_grad():
        terms = task.loss_terms(batch)
        assert terms["loss"].item() == pytest.approx(math.log(2), abs=1e-5)  # fresh LoRA = the reference
        assert task.loss_terms(batch, per_pair=True)["loss"].shape == (4,)
        # the replies' log-probabilities are taken with the image: other pixels give other values
        seen = sequence_logps(task._logits(batch)[0], batch["labels"])[0]
        other = {**batch, "inputs": {**batch["inputs"], "pixel_values": pixels.flip(0)}}
        assert not torch.allclose(seen, sequence_logps(task._logits(other)[0], batch["labels"])[0])
    with pytest.raises(ConfigError, match="'kto' reads unpaired rows"):
        VisionPreferenceTask(model={"name": str(model_dir)}, preference={"loss": "kto"})


def test_bad_preference_rows_are_named(model_dir, tmp_path):
    path = tmp_path / "bad.jsonl"
    image = make_images(1, tmp_path / "img")[0]
    path.write_text(json.dumps({"id": "x1", "image": str(image), "prompt": "What?", "chosen": "a red square"}) + "\n")
    with pytest.raises(DataError, match="sample x1: field 'rejected' must be a non-empty reply text"):
        VisionPreferenceData(path=str(path), num_workers=0).setup("fit")


def test_vlm_dpo_learns_the_preference_through_the_cli_and_exports(model_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    train, val = preference_file(tmp_path / "train", 32, 0), preference_file(tmp_path / "val", 8, 1)
    cfg = tmp_path / "vlm_dpo.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"class_path": "VisionPreferenceTask", "init_args": {
            "model": {"name": str(model_dir)}, "adapter": {"method": "lora", "r": 8},
            "optimizer": {"lr": 0.01, "warmup": 0}, "preference": {"loss": "dpo", "beta": 0.5},
            "monitor": {"early_stopping": False}}},
        "data": {"class_path": "VisionPreferenceData", "init_args": {"path": str(train), "val_path": str(val),
                                                                    "test_path": str(val), "batch_size": 8,
                                                                    "num_workers": 0}},
        "trainer": {"accelerator": "cpu", "max_epochs": 4, "enable_progress_bar": False, "enable_model_summary": False,
                    "num_sanity_val_steps": 0},
    }))
    runs = tmp_path / "runs"
    run_cli("fit", "--config", cfg, "--runs_dir", runs)
    run = runs / "vlm_dpo" / "version_0"
    rows = [line.split(",") for line in (run / "metrics.csv").read_text().splitlines()]
    header, values = rows[0], rows[1:]
    series = {name: [float(r[header.index(name)]) for r in values if r[header.index(name)]]
              for name in ("val/loss", "val/accuracy", "val/reward_margin")}
    print(series)
    assert series["val/loss"][-1] < 0.7 * math.log(2) and series["val/accuracy"][-1] >= 0.85
    assert series["val/reward_margin"][-1] > 0
    run_cli("test", "--config", cfg, "--ckpt_path", run / "checkpoints/best.ckpt", "--runs_dir", runs)
    records = [json.loads(line) for line in (run / "records/test.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "preference" and len(records) == 1 + 8
    assert {"loss", "reward_margin", "accuracy"} <= set(records[1]["stats"]) and records[1]["meta"]["site"]
    out = tmp_path / "export"
    run_cli("export", "--ckpt_path", run / "checkpoints/best.ckpt", "--out", out)
    assert AutoModelForImageTextToText.from_pretrained(out) is not None and not list(out.glob("adapter_*"))


@pytest.mark.parametrize("family", ["llava", "idefics3"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_on_the_language_model_of_a_vlm(tmp_path, method, family):
    model_dir = tiny_vlm_dir(family, tmp_path / "vlm")
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from tests.support.tiny_vlms import caption_rows

    path = tmp_path / "captions.jsonl"
    path.write_text("".join(json.dumps({"image": str(p), "text": t}) + "\n" for p, t in caption_rows(8, tmp_path / "i")))
    task = VisionLanguageTask(model={"name": str(model_dir)}, adapter={"method": method, "num_virtual_tokens": 3},
                              optimizer={"lr": 0.05, "warmup": 0})
    from mmtune.data.vl_data import VisionTextData, VisualCollate

    dm = VisionTextData(path=str(path), split=(1.0, 0.0, 0.0), batch_size=4, num_workers=0, prompt="What is shown?")
    dm.setup("fit")
    dm.connect(task.encoding)
    task.configure_model()
    dataset = dm._dataset("train")
    batch = VisualCollate(dm.encoding, dm.max_length, with_prompts=True)([dataset[i] for i in range(4)])
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=0.05)
    task.train()
    losses = []
    for _ in range(8):
        total, count = task.loss_sums(batch)
        loss = total / count
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert len(task.generate_batch(batch["prompt_inputs"])) == 4
    out = task.export(str(tmp_path / "export"))
    assert (out / "adapter_config.json").is_file() and "AutoModelForImageTextToText" in (out / "LOADING.md").read_text()
    task.eval()
    with torch.no_grad():
        want = task._logits(batch)[0]
        # as the note says: the base with its fully trained projector is saved beside the adapter
        assert "base" in (out / "LOADING.md").read_text()
        model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(out / "base"), out).eval()
        got = model(**task._inputs(batch["inputs"]), use_cache=False).logits[:, -batch["labels"].shape[1]:]
    assert torch.allclose(got, want, atol=1e-5)


def test_prompt_learning_is_refused_where_positions_come_from_the_ids(model_dir):
    task = VisionLanguageTask(model={"name": str(model_dir)}, adapter={"method": "prefix"})
    with pytest.raises(ConfigError, match="'prefix' .* does not apply to this model \\(Qwen2VLForConditionalGeneration\\)"):
        task.configure_model()
