"""The formats of the field, each read into the same samples and trained on end to end: NumPy arrays
(MedMNIST layout), Hugging Face `datasets` (saved folder, Parquet), DICOM (pydicom), tar shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import only_version, run_cli, write_config, write_csv
from mmtune import DataError, ImageClassificationData
from mmtune.data.formats_dicom import dicom_frame
from support.format_files import color_arrays, write_dicom, write_medmnist, write_saved_dataset, write_shards

DATA_CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
               "interpolation": "bilinear", "crop_pct": 1.0}
NAMES = ["red", "green", "blue"]


def _fit(tmp_path, tiny_models, path, **data_args):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_models["vit"], path, trainer={"max_epochs": 1},
                       data_args={"group_column": None, **data_args})
    run_cli("fit", "--config", cfg, "--runs_dir", tmp_path / "runs", "--run_name", "fmt")
    run = only_version(tmp_path / "runs", "fmt")
    fit = json.loads((run / "metrics.json").read_text())["fit"]
    assert fit["global_step"] > 0 and "val/accuracy" in fit["metrics"]
    return json.loads((run / "data_stats.json").read_text())


def _dm(path, **kwargs):
    dm = ImageClassificationData(path=str(path), num_workers=0, **kwargs)
    dm.setup("fit")
    return dm


# ---- NumPy ---------------------------------------------------------------------------------------
def test_a_medmnist_npz_trains_with_its_own_splits(tmp_path, tiny_models):
    stats = _fit(tmp_path, tiny_models, write_medmnist(tmp_path / "colors.npz"), class_names=NAMES)
    assert {k: v["samples"] for k, v in stats["splits"].items()} == {"train": 24, "val": 9, "test": 9}
    assert stats["class_counts"]["val"] == {"blue": 3, "green": 3, "red": 3}


def test_npz_arrays_that_disagree_in_length_are_named(tmp_path):
    x, y = color_arrays(4)
    np.savez(tmp_path / "bad.npz", train_images=x, train_labels=y[:-2])
    with pytest.raises(DataError, match=r"bad.npz\[train_images\] has 12 images but bad.npz\[train_labels\] has 10"):
        _dm(tmp_path / "bad.npz")


def test_npy_pair_and_multi_hot_labels_are_multi_label(tmp_path):
    x, y = color_arrays(4)
    np.save(tmp_path / "images.npy", x)
    np.save(tmp_path / "labels.npy", np.eye(3, dtype=np.int64)[y] | np.eye(3, dtype=np.int64)[(y + 1) % 3])
    dm = _dm(tmp_path / "images.npy", class_names=NAMES)
    assert dm.multi_label and dm.classes == sorted(NAMES)
    dm.connect(dm.classes, True, DATA_CONFIG)
    item = dm._dataset("train")[0]
    assert item["pixels"].shape == (3, 32, 32) and item["target"].sum() == 2


# ---- Hugging Face datasets -----------------------------------------------------------------------
def test_a_saved_datasets_folder_trains(tmp_path, tiny_models):
    stats = _fit(tmp_path, tiny_models, write_saved_dataset(tmp_path / "ds"), path_column="image", split=(0.5, 0, 0.5))
    assert stats["splits"]["val"]["samples"] == 9 and set(stats["class_counts"]["train"]) == set(NAMES)


def test_parquet_with_image_paths_and_missing_columns(tmp_path):
    import datasets

    folder = write_saved_dataset(tmp_path / "ds", as_paths=True)
    parquet = tmp_path / "train.parquet"
    datasets.load_from_disk(str(folder))["train"].to_parquet(str(parquet))
    dm = _dm(parquet, split=(0.5, 0.25, 0.25))
    assert len(dm.splits["train"]) == 12 and dm.classes == sorted(NAMES)  # ClassLabel names, not ids
    dm.connect(dm.classes, False, DATA_CONFIG)
    assert dm._dataset("train")[0]["pixels"].shape == (3, 32, 32)
    with pytest.raises(DataError, match=r"no column 'diagnosis' \(its columns: \['image', 'label'\]\)"):
        _dm(parquet, label_column="diagnosis")


# ---- DICOM ---------------------------------------------------------------------------------------
def test_dicom_rescale_window_and_monochrome1(tmp_path):
    ramp = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (4, 1))  # 0 .. 990
    # stored * 2 - 1000: -1000 .. 980; window (0, 1000) shows -500 .. 500
    file = write_dicom(tmp_path / "a.dcm", ramp, slope=2.0, intercept=-1000.0, window=(0.0, 1000.0))
    got = np.asarray(dicom_frame(str(file), 0, None)).astype(int)
    value = ramp[0].astype(float) * 2 - 1000
    want = np.clip((value + 500) / 1000, 0, 1) * 255
    assert np.abs(got[0] - want).max() <= 1
    inverted = np.asarray(dicom_frame(str(write_dicom(tmp_path / "b.dcm", ramp, photometric="MONOCHROME1")), 0, None))
    assert inverted[0, 0] == 255 and inverted[0, -1] == 0  # MONOCHROME1: the lowest value is white
    narrow = np.asarray(dicom_frame(str(file), 0, (0.0, 100.0)))  # the config's window wins
    assert (narrow[0] == 255).sum() > (got[0] == 255).sum()


def _dicom_set(root, bad: bool = False):
    rows = []
    for j, level in enumerate((200, 2000, 4000)):
        for i in range(6):
            pixels = np.random.default_rng(i).normal(level, 100, (2, 32, 32)).clip(0, 65535)
            file = write_dicom(root / f"{NAMES[j]}{i}.dcm", pixels, patient=f"patient-{i % 3}", window=(2000.0, 4400.0))
            rows.append((file.name, NAMES[j]))  # two frames each
    if bad:
        from pydicom.uid import JPEGLSLossless

        write_dicom(root / "report.dcm", np.zeros((4, 4)), pixel_data=False)
        write_dicom(root / "jpegls.dcm", np.zeros((4, 4)), transfer_syntax=JPEGLSLossless)
        rows += [("report.dcm", "red"), ("jpegls.dcm", "red")]
    return write_csv(root / "dicom.csv", ["path", "label"], rows)


def test_dicom_frames_groups_and_ids_kept_out(tmp_path):
    manifest = _dicom_set(tmp_path)
    dm = _dm(manifest, dicom_group="PatientID")
    samples = [s for rows in dm.splits.values() for s in rows]
    assert len(samples) == 36 and sum("[frame 1]" in s.path for s in samples) == 18
    split_of = {}
    for name, rows in dm.splits.items():
        for s in rows:
            assert split_of.setdefault(s.group, name) == name  # a patient's images stay in one split
            assert s.group.startswith("id-") and "patient" not in s.group and "PatientID" not in s.meta
    assert len(split_of) == 3
    plain = _dm(manifest, dicom_group="StudyInstanceUID", anonymize_ids=False)
    assert plain.splits["train"][0].meta["PatientID"].startswith("patient-")


def test_dicom_without_pixels_or_with_an_unsupported_syntax_is_named(tmp_path):
    manifest = _dicom_set(tmp_path, bad=True)
    with pytest.raises(DataError, match=r"2 unreadable image.*report.dcm: no pixel data.*jpegls.dcm: transfer syntax JPEG-LS"):
        _dm(manifest)
    dm = _dm(manifest, bad_images="skip")
    assert len(dm.skipped) == 2 and sum(len(v) for v in dm.splits.values()) == 36


def test_a_dicom_folder_trains(tmp_path, tiny_models):
    for j, level in enumerate((200, 2000, 4000)):
        (tmp_path / "data" / NAMES[j]).mkdir(parents=True)
        for i in range(6):
            pixels = np.random.default_rng(i).normal(level, 100, (32, 32)).clip(0, 65535)
            write_dicom(tmp_path / "data" / NAMES[j] / f"{i}.dcm", pixels, photometric="MONOCHROME1")
    stats = _fit(tmp_path, tiny_models, tmp_path / "data")
    assert sum(v["samples"] for v in stats["splits"].values()) == 18


# ---- shards --------------------------------------------------------------------------------------
def test_tar_shards_train_and_resume_mid_epoch_at_the_same_batch(tmp_path, tiny_models):
    shards = write_shards(tmp_path / "shards")
    stats = _fit(tmp_path, tiny_models, shards)
    assert {k: v["samples"] for k, v in stats["splits"].items()} == {"train": 24, "val": 6, "test": 0}

    def loader():
        dm = _dm(shards, batch_size=4)
        dm.connect(dm.classes, False, DATA_CONFIG)
        return dm.train_dataloader()
    straight = [b["index"].tolist() for b in loader()]
    first = loader()
    batches = iter(first)
    seen = [next(batches)["index"].tolist() for _ in range(2)]
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert seen + [b["index"].tolist() for b in resumed] == straight


def test_datasets_tables_feed_the_text_pair_and_vlm_readers_too(tmp_path):
    """Text rows from a saved folder and an Arrow file; image-text pairs and captions from Parquet
    whose Image column holds paths."""
    import datasets

    from mmtune.data.pairs import read_pairs
    from mmtune.data.text_reading import TextSource, read_source
    from mmtune.data.vl_samples import VisualFields, read_visual_source

    chat = datasets.Dataset.from_dict({"instruction": ["say hi", "count"], "output": ["hi", "1 2 3"]})
    chat.save_to_disk(str(tmp_path / "chat"))
    assert [s.messages[-1]["content"] for s in read_source(TextSource(str(tmp_path / "chat")))] == ["hi", "1 2 3"]
    arrow = next((tmp_path / "chat").glob("*.arrow"))
    assert len(read_source(TextSource(str(arrow)))) == 2

    x, y = color_arrays(8)
    (tmp_path / "imgs").mkdir()
    paths = []
    for i, a in enumerate(x):
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
        paths.append(f"imgs/{i}.png")  # relative to the table's folder
    table = datasets.Dataset.from_dict({"image": paths, "text": [f"a {NAMES[l]} square" for l in y]})
    table.to_parquet(str(tmp_path / "pairs.parquet"))
    pairs, bad = read_pairs(str(tmp_path / "pairs.parquet"))
    assert len(pairs) == 24 and not bad and pairs[0].path.endswith(".png") and pairs[0].text.startswith("a ")
    seen = []
    samples = read_visual_source(str(tmp_path / "pairs.parquet"), "auto", VisualFields(), None, "Describe.", "<image>",
                                 lambda origin, err: seen.append(err))
    assert not seen and len(samples) == 24
