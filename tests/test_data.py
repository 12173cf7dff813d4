"""Readers, splits, image decoding and bad input for image classification data."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from conftest import make_color_set, run_cli, write_config, write_csv
from mmtune import DataError, ImageClassificationData
from mmtune.data.images import load_image
from mmtune.data.splits import assign_splits, split_name

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "crop_pct": 1.0}


def _dm(path, **kwargs):
    kwargs.setdefault("num_workers", 0)
    return ImageClassificationData(path=str(path), **kwargs)


def test_groups_never_cross_splits_and_split_is_deterministic():
    groups = [f"patient{i % 37}" for i in range(1000)]
    a = assign_splits(1000, (0.7, 0.15, 0.15), seed=3, groups=groups)
    assert a == assign_splits(1000, (0.7, 0.15, 0.15), seed=3, groups=groups)
    assert a != assign_splits(1000, (0.7, 0.15, 0.15), seed=4, groups=groups)
    split_of = {}
    for g, s in zip(groups, a):
        assert split_of.setdefault(g, s) == s, f"group {g} is in two splits"
    counts = Counter(a)
    assert abs(counts["train"] / 1000 - 0.7) < 0.06 and counts["val"] > 0 and counts["test"] > 0


def test_ungrouped_split_matches_ratios():
    counts = Counter(assign_splits(200, (0.7, 0.15, 0.15), seed=0))
    assert counts == {"train": 140, "val": 30, "test": 30}


def test_manifest_split_column_and_group_column(tmp_path):
    manifest = make_color_set(tmp_path, per_class=10, groups=5)
    dm = _dm(manifest, group_column="group", split=(0.6, 0.2, 0.2))
    dm.setup("fit")
    seen = {}
    for split, samples in dm.splits.items():
        for s in samples:
            assert seen.setdefault(s.group, split) == split
    assert dm.classes == ["blue", "green", "red"] and not dm.multi_label

    rows = list(csv.reader(manifest.open()))[1:]
    explicit = write_csv(tmp_path / "split.csv", ["path", "label", "split"],
                         [(p, label, ("train", "val", "test")[i % 3]) for i, (p, label, _) in enumerate(rows)])
    dm = _dm(explicit)
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 10, "val": 10, "test": 10}


def test_folder_layouts(tmp_path):
    make_color_set(tmp_path / "flat", per_class=4)
    dm = _dm(tmp_path / "flat", split=(0.5, 0.25, 0.25))
    dm.setup("fit")
    assert dm.classes == ["blue", "green", "red"] and sum(map(len, dm.splits.values())) == 12
    for split in ("train", "val", "test"):
        make_color_set(tmp_path / "tree" / split, per_class=2)
    dm = _dm(tmp_path / "tree")
    dm.setup("fit")
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 6, "val": 6, "test": 6}


def test_jsonl_manifest_and_multilabel(tmp_path):
    make_color_set(tmp_path, per_class=6)
    lines = [f'{{"path": "red/{i}.png", "label": "red|blue"}}' if i % 2 else f'{{"path": "green/{i}.png", "label": ["green"]}}'
             for i in range(6)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    dm = _dm(tmp_path / "m.jsonl", split=(0.5, 0.5, 0.0))
    dm.setup("fit")
    assert dm.multi_label and set(dm.classes) <= {"blue", "green", "red"}
    dm.connect(["blue", "green", "red"], True, DATA_CONFIG)
    item = dm._dataset("train")[0]
    assert item["target"].shape == (3,) and item["target"].sum() >= 1


def test_batches_have_model_input_size(tmp_path, color_set):
    dm = _dm(color_set, batch_size=4, image_size=48)
    dm.setup("fit")
    dm.connect(dm.classes, False, DATA_CONFIG)
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixels"].shape == (4, 3, 48, 48) and batch["target"].dtype.is_floating_point is False


def test_balanced_sampler_evens_out_classes(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for name, count in (("common", 40), ("rare", 4)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name / f"{i}.png")
            rows.append((f"{name}/{i}.png", name, "train"))
    manifest = write_csv(tmp_path / "m.csv", ["path", "label", "split"], rows + [rows[0][:2] + ("val",)])
    dm = _dm(manifest, sampler="balanced", batch_size=44)
    dm.setup("fit")
    dm.connect(dm.classes, False, DATA_CONFIG)
    loader = dm.train_dataloader()
    drawn = Counter()
    for epoch in range(5):
        loader.sampler.set_epoch(epoch)
        drawn.update(dm.splits["train"][i].labels[0] for _, i in loader.sampler)
    assert 0.35 < drawn["rare"] / sum(drawn.values()) < 0.65


def test_image_modes(tmp_path):
    deep = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)  # 12-bit data in a 16-bit PNG
    Image.fromarray(deep).save(tmp_path / "xray16.png")
    img = load_image(str(tmp_path / "xray16.png"), channels=1)
    arr = np.asarray(img)
    assert img.mode == "L" and arr.min() == 0 and arr.max() == 255  # min-max windowing uses the full range
    full = np.asarray(load_image(str(tmp_path / "xray16.png"), channels=1, high_bit="full_range"))
    assert full.max() < 20  # 4095/65535 of the range
    assert load_image(str(tmp_path / "xray16.png"), channels=3).mode == "RGB"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert load_image(str(tmp_path / "clear.png")).getpixel((0, 0)) == (255, 255, 255)
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert load_image(str(tmp_path / "cmyk.jpg")).mode == "RGB"
    Image.new("L", (8, 8), 7).save(tmp_path / "gray.png")
    assert load_image(str(tmp_path / "gray.png")).getpixel((0, 0)) == (7, 7, 7)


# ---- bad input ------------------------------------------------------------------------------------

def test_missing_file_is_named_with_its_row(tmp_path):
    manifest = make_color_set(tmp_path, per_class=4)
    with manifest.open("a") as f:
        f.write("red/nope.png,red,g1\n")
    with pytest.raises(DataError, match=r"manifest.csv row 14: .*nope.png"):
        _dm(manifest).setup("fit")


def _corrupt(tmp_path):
    manifest = make_color_set(tmp_path, per_class=8)
    (tmp_path / "red" / "0.png").write_bytes(b"not an image")
    data = (tmp_path / "green" / "1.png").read_bytes()
    (tmp_path / "green" / "1.png").write_bytes(data[: len(data) // 2])  # truncated
    return manifest


def test_corrupt_images_stop_with_policy_error(tmp_path):
    with pytest.raises(DataError, match=r"2 unreadable image\(s\).*row 2.*red/0.png.*green/1.png"):
        _dm(_corrupt(tmp_path)).setup("fit")


def test_corrupt_images_skipped_and_listed_in_run_dir(tmp_path, tiny_models):
    manifest = _corrupt(tmp_path)
    cfg = write_config(tmp_path / "skip.yaml", tiny_models["vit"], manifest, data_args={"bad_images": "skip"},
                       trainer={"max_epochs": 1})
    run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs")
    listed = list(csv.DictReader((tmp_path / "runs" / "skip" / "version_0" / "skipped_images.csv").open()))
    assert sorted(r["path"].rsplit("/", 2)[-2] + "/" + r["path"].rsplit("/", 1)[-1] for r in listed) == ["green/1.png", "red/0.png"]
    assert all(r["reason"] for r in listed)


def test_label_outside_class_list(tmp_path):
    manifest = make_color_set(tmp_path, per_class=6)
    test = write_csv(tmp_path / "test.csv", ["path", "label"], [("red/0.png", "red"), ("red/1.png", "purple")])
    dm = _dm(manifest, test_path=str(test))
    dm.setup("fit")
    with pytest.raises(DataError, match=r"test.csv row 3: label 'purple' is not in the class list"):
        dm.connect(dm.classes, False, DATA_CONFIG)


def test_empty_split_is_an_error(tmp_path):
    manifest = make_color_set(tmp_path, per_class=4, groups=1)  # one group: everything lands in one split
    dm = _dm(manifest, group_column="group")
    dm.setup("fit")
    dm.connect(dm.classes, False, DATA_CONFIG)
    with pytest.raises(DataError, match="the val split is empty"):
        dm.val_dataloader()


def test_empty_label_in_multiclass_data(tmp_path):
    manifest = make_color_set(tmp_path, per_class=4)
    with manifest.open("a") as f:
        f.write("red/1.png,,g1\n")
    with pytest.raises(DataError, match="row 14: empty label"):
        _dm(manifest, split=(1.0, 0.0, 0.0)).setup("fit")


def test_a_split_a_source_names_is_read_by_its_aliases_or_refused_with_its_row(tmp_path):
    assert [split_name(v, "x") for v in ("Train", " validation", "dev", "TEST", "", None)] == \
        ["train", "val", "val", "test", None, None]
    from mmtune.data.pairs import read_pairs

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = write_csv(tmp_path / "pairs.csv", ["image", "text", "split"],
                         [("a.png", "a red square", "train"), ("a.png", "a red square", "holdout")])
    with pytest.raises(DataError, match=r"pairs.csv row 3: unknown split 'holdout' \(use train, val or test\)"):
        read_pairs(str(manifest))
