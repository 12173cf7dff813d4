"""Stratified splits: class shares within one item of their target, groups never split, multi-label by
iterative stratification, and a warning for a class too small for every split."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from conftest import write_csv
from mmtune import ImageClassificationData
from mmtune.data.splits import assign_splits

SHARES = (0.7, 0.15, 0.15)


def test_each_class_is_within_one_item_of_its_share_in_every_split():
    rng = np.random.default_rng(0)
    labels = [(str(c),) for c in rng.choice(6, size=361, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.05])]
    splits = assign_splits(len(labels), SHARES, seed=5, labels=labels)
    assert splits == assign_splits(len(labels), SHARES, seed=5, labels=labels)
    per_class = Counter(l[0] for l in labels)
    got = Counter(zip((l[0] for l in labels), splits))
    for c, n in per_class.items():
        for name, share in zip(("train", "val", "test"), SHARES):
            assert abs(got[c, name] - share * n) < 1, (c, name, got[c, name], share * n)
    sizes = Counter(splits)
    for name, share in zip(("train", "val", "test"), SHARES):
        assert abs(sizes[name] - share * len(labels)) <= 2  # the totals stay on target too


def test_a_balanced_set_gets_balanced_validation_classes():
    """The case from the field: 360 images of 6 classes split 70/15/15 gave val classes of 4 to 15."""
    labels = [(f"c{i % 6}",) for i in range(360)]
    splits = assign_splits(360, SHARES, seed=42, labels=labels)
    val = Counter(l[0] for l, s in zip(labels, splits) if s == "val")
    assert set(val.values()) == {9}


def test_grouped_stratified_split_keeps_groups_whole_and_classes_close():
    rng = np.random.default_rng(1)
    groups, labels = [], []
    for g in range(120):  # patients with 1-6 images, most of one class
        main = rng.choice(4, p=[0.5, 0.25, 0.15, 0.1])
        for _ in range(rng.integers(1, 7)):
            groups.append(f"p{g}")
            labels.append((f"c{main if rng.random() < 0.9 else rng.integers(4)}",))
    splits = assign_splits(len(labels), SHARES, seed=3, groups=groups, labels=labels)
    split_of = {}
    for g, s in zip(groups, splits):
        assert split_of.setdefault(g, s) == s, f"group {g} is in two splits"
    per_class = Counter(l[0] for l in labels)
    got = Counter(zip((l[0] for l in labels), splits))
    for c, n in per_class.items():
        for name, share in zip(("train", "val", "test"), SHARES):
            assert abs(got[c, name] / n - share) < 0.06, (c, name)
    unstratified = assign_splits(len(labels), SHARES, seed=3, groups=groups)
    def worst(assigned):
        per = Counter(zip((l[0] for l in labels), assigned))
        return max(abs(per[c, "val"] / n - 0.15) for c, n in per_class.items())
    assert worst(splits) <= worst(unstratified)


def test_multilabel_split_uses_iterative_stratification():
    rng = np.random.default_rng(2)
    labels = [tuple(c for c in "abcde" if rng.random() < p) for p in rng.uniform(0.1, 0.5, size=400)]
    splits = assign_splits(len(labels), SHARES, seed=0, labels=labels)
    sizes = Counter(splits)
    assert abs(sizes["val"] - 60) <= 4 and abs(sizes["test"] - 60) <= 4  # iterative stratification trades size for balance
    for c in "abcde":
        n = sum(c in l for l in labels)
        for name, share in zip(("train", "val", "test"), SHARES):
            have = sum(c in l for l, s in zip(labels, splits) if s == name)
            assert abs(have - share * n) <= 2, (c, name, have, share * n)


def _manifest(tmp_path, rows):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    return write_csv(tmp_path / "m.csv", ["path", "label"], [("x.png", label) for label in rows])


def test_setup_prints_splits_warns_of_a_too_small_class_and_writes_the_stats(tmp_path, caplog, capsys):
    manifest = _manifest(tmp_path, ["a"] * 20 + ["b"] * 20 + ["rare"])
    dm = ImageClassificationData(path=str(manifest), num_workers=0, verify_images=False)
    with pytest.warns(UserWarning, match=r"class 'rare' \(1 item\(s\)\) is not in the val and test split"):
        dm.setup("fit")
    assert dm.split_warnings and "rare" in dm.split_warnings[0]
    assert Counter(s.labels[0] for s in dm.splits["val"]) == {"a": 3, "b": 3}

    class Trainer:  # what _write_stats asks of the trainer
        log_dir, is_global_zero = str(tmp_path / "run"), True
    dm.trainer = Trainer()
    (tmp_path / "run").mkdir()
    dm.teardown("fit")
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["class_counts"]["val"] == {"a": 3, "b": 3} and stats["split"]["stratified"] is True
    assert stats["splits"]["train"]["samples"] == 14 + 14 + 1 and "rare" in stats["warnings"][0]


def test_the_report_shows_how_the_data_was_split_and_the_warning(tmp_path):
    from mmtune.evaluation.report.collect import RunData
    from mmtune.evaluation.report.summary import data_section

    stats = {"splits": {"train": {"samples": 29}, "val": {"samples": 6}, "test": {"samples": 6}},
             "class_counts": {"train": {"a": 14, "b": 14, "rare": 1}, "val": {"a": 3, "b": 3}},
             "split": {"shares": [0.7, 0.15, 0.15], "stratified": True, "grouped_by": "patient", "seed": 42},
             "warnings": ["class 'rare' (1 item(s)) is not in the val and test split(s)"]}
    body = data_section(RunData(tmp_path, data_stats=stats)).body
    assert "stratified by label, groups of &#x27;patient&#x27; kept whole" in body or \
        "stratified by label, groups of 'patient' kept whole" in body
    assert "class &#x27;rare&#x27;" in body or "class 'rare'" in body
    assert "train 29 · val 6 · test 6" in body
