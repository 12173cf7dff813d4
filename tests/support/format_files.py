"""Small data sets in the formats of the field, made by the tests: an `.npz` (MedMNIST layout), a
saved `datasets` folder, DICOM files written with pydicom, WebDataset tar shards."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import COLORS


def color_arrays(n_per_class: int, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(N, size, size, 3) uint8 noisy color images and their class indices (0 red, 1 green, 2 blue)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for j, rgb in enumerate(COLORS.values()):
        for _ in range(n_per_class):
            images.append(np.clip(rng.normal(0, 30, (size, size, 3)) + rgb, 0, 255).astype(np.uint8))
            labels.append(j)
    return np.stack(images), np.array(labels)


def write_medmnist(path: Path) -> Path:
    """train/val/test arrays with (N, 1) labels, as MedMNIST ships them."""
    arrays = {}
    for split, n, seed in (("train", 8, 0), ("val", 3, 1), ("test", 3, 2)):
        x, y = color_arrays(n, seed)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y[:, None]
    np.savez(path, **arrays)
    return path


def write_saved_dataset(folder: Path, as_paths: bool = False) -> Path:
    """A DatasetDict (train/validation) with an `Image` column (bytes, or paths) and a ClassLabel."""
    import datasets

    parts = {}
    for split, n, seed in (("train", 8, 0), ("validation", 3, 1)):
        x, y = color_arrays(n, seed)
        if as_paths:
            (folder.parent / "imgs").mkdir(parents=True, exist_ok=True)
            images = []
            for i, a in enumerate(x):
                Image.fromarray(a).save(folder.parent / "imgs" / f"{split}{i}.png")
                images.append(str(folder.parent / "imgs" / f"{split}{i}.png"))
        else:
            images = [Image.fromarray(a) for a in x]
        features = datasets.Features({"image": datasets.Image(),
                                      "label": datasets.ClassLabel(names=list(COLORS))})
        parts[split] = datasets.Dataset.from_dict({"image": images, "label": y.tolist()}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


def write_dicom(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", slope: float = 1.0,
                intercept: float = 0.0, window: tuple[float, float] | None = None, patient: str = "P1",
                study: str = "1.2.3.1", transfer_syntax=None, pixel_data: bool = True) -> Path:
    """A DICOM file of uint16 `pixels` ((H, W) or (frames, H, W)) with the given tags."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient, study, study + ".1"
    ds.Modality = "OT"
    frames = pixels if pixels.ndim == 3 else pixels[None]
    ds.Rows, ds.Columns = frames.shape[1:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = frames.shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if pixel_data and meta.TransferSyntaxUID.is_compressed:  # bytes no decoder here can read, encapsulated
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\xff\x4f" + bytes(30)])
    elif pixel_data:
        ds.PixelData = frames.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_shards(folder: Path) -> Path:
    """train-000000.tar, train-000001.tar and val-000000.tar of `key.png` + `key.cls` members."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for shard, n, seed in (("train-000000", 4, 0), ("train-000001", 4, 1), ("val-000000", 2, 2)):
        x, y = color_arrays(n, seed)
        with tarfile.open(folder / f"{shard}.tar", "w") as tar:
            for i, (a, label) in enumerate(zip(x, y)):
                for name, data in ((f"s{seed}_{i:04d}.png", _png(a)), (f"s{seed}_{i:04d}.cls", names[label].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


def _png(a: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(a).save(out, format="PNG")
    return out.getvalue()
