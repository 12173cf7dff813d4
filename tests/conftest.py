"""Shared fixtures: tiny models saved like a user's checkpoint, and small data sets made here."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a model hub in tests

COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def _noisy(rgb, rng, size=32):
    return np.clip(rng.normal(0, 40, (size, size, 3)) + rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny ViT and a tiny ResNet (with BatchNorm), saved with timm's `save_for_hf` and loaded back
    through `model.name: <dir>` like any local checkpoint."""
    import timm

    root = tmp_path_factory.mktemp("models")
    out = {}
    torch.manual_seed(0)  # the same tiny weights in every run, so a test's margins do not move between runs
    for key, name, kwargs in (("vit", "test_vit", {"img_size": 32}), ("cnn", "test_resnet", {})):
        model = timm.create_model(name, num_classes=10, **kwargs)
        timm.models.save_for_hf(model, str(root / key), safe_serialization=True)
        out[key] = root / key
    return out


def make_color_set(root: Path, per_class: int = 16, groups: int = 8, seed: int = 0) -> Path:
    """Three color classes of noisy 32x32 images and a manifest with a group column."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, rgb in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_noisy(rgb, rng)).save(root / name / f"{i}.png")
            rows.append((f"{name}/{i}.png", name, f"g{i % groups}"))
    manifest = root / "manifest.csv"
    write_csv(manifest, ["path", "label", "group"], rows)
    return manifest


def write_csv(path: Path, header: list[str], rows) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def color_set(tmp_path_factory) -> Path:
    return make_color_set(tmp_path_factory.mktemp("colors"))


@pytest.fixture(scope="session")
def multilabel_set(tmp_path_factory) -> Path:
    """Images whose left and right halves have colors; labels are the set of colors present."""
    root = tmp_path_factory.mktemp("multilabel")
    rng = np.random.default_rng(1)
    names = list(COLORS)
    rows = []
    for i in range(60):
        a, b = names[i % 3], names[(i // 3) % 3]
        img = np.concatenate([_noisy(COLORS[a], rng)[:, :16], _noisy(COLORS[b], rng)[:, 16:]], axis=1)
        Image.fromarray(img).save(root / f"{i}.png")
        rows.append((f"{i}.png", "|".join(sorted({a, b})), f"p{i % 12}"))
    return write_csv(root / "labels.csv", ["path", "label", "patient"], rows)


def write_config(path: Path, model_dir: Path, data_path: Path, model_args: dict | None = None,
                 data_args: dict | None = None, trainer: dict | None = None) -> Path:
    """A complete classification config, the way users write them."""
    config = {
        "model": {"class_path": "ImageClassificationTask",
                  "init_args": {"model": {"name": str(model_dir)}, "optimizer": {"lr": 0.01, "warmup": 0.1},
                                **(model_args or {})}},
        "data": {"class_path": "ImageClassificationData",
                 "init_args": {"path": str(data_path), "batch_size": 8, "num_workers": 0, "group_column": "group",
                               **(data_args or {})}},
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "enable_progress_bar": False,
                    "enable_model_summary": False, **(trainer or {})},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_cli(*args: str) -> None:
    """Runs `mmtune ARGS` in this process."""
    from mmtune.cli import main

    main([str(a) for a in args])


def only_version(runs: Path, name: str) -> Path:
    versions = sorted((runs / name).glob("version_*"))
    assert len(versions) == 1, versions
    return versions[0]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one torch thread ran the text tests 4x faster than two
    (the threads of a 64-wide matmul mostly wait for each other when other processes hold the cores).
    Text test modules use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
