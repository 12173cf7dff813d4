"""A large manifest sets up without decoding its images: headers checked once, cached by (path, size,
mtime); a changed file is checked again; a sample costs well under 1 KB."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmtune import DataError, ImageClassificationData
from mmtune.data import image_headers

ROWS = 20_000


@pytest.fixture(scope="module")
def big_manifest(tmp_path_factory):
    """ROWS rows, each its own path: hard links of three small PNGs (one inode each)."""
    root = tmp_path_factory.mktemp("big")
    (root / "img").mkdir()
    for j in range(3):
        Image.fromarray(np.full((16, 16, 3), 80 * j, np.uint8)).save(root / f"src{j}.png")
    lines = ["path,label"]
    for i in range(ROWS):
        os.link(root / f"src{i % 3}.png", root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,c{i % 3}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root


class Counting:
    def __init__(self, monkeypatch) -> None:
        self.decodes = self.checks = 0
        real_load, real_check = ImageFile.ImageFile.load, image_headers.check_header

        def load(img, *a, **k):
            self.decodes += 1
            return real_load(img, *a, **k)

        def check(path, full):
            self.checks += 1
            return real_check(path, full)
        monkeypatch.setattr(ImageFile.ImageFile, "load", load)
        monkeypatch.setattr(image_headers, "check_header", check)


def _setup(root, cache, **kwargs):
    dm = ImageClassificationData(path=str(root / "m.csv"), num_workers=2, header_cache=str(cache), **kwargs)
    dm.setup("fit")
    return dm


def test_a_large_manifest_sets_up_from_headers_then_from_the_cache(big_manifest, tmp_path, monkeypatch):
    count = Counting(monkeypatch)
    dm = _setup(big_manifest, tmp_path / "cache")
    assert sum(len(v) for v in dm.splits.values()) == ROWS
    assert count.decodes == 0 and count.checks == ROWS  # every header read, no pixels decoded

    count.checks = 0
    tracemalloc.start()
    dm = _setup(big_manifest, tmp_path / "cache")
    retained, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count.checks == 0 and count.decodes == 0  # the second setup only stats the files
    assert retained / ROWS < 1024, f"{retained / ROWS:.0f} bytes a row"
    del dm

    # a file replaced by a truncated one (new size and mtime) is checked again, not trusted
    changed = big_manifest / "img" / "7.png"
    data = (big_manifest / "src1.png").read_bytes()
    changed.unlink()
    changed.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"1 unreadable image.*m.csv row 9: .*img/7.png"):
        _setup(big_manifest, tmp_path / "cache")
    assert count.checks == 1


def test_full_verification_decodes_and_off_checks_nothing(tmp_path, monkeypatch):
    root = tmp_path
    (root / "img").mkdir()
    lines = ["path,label"]
    for i in range(30):
        Image.fromarray(np.full((8, 8, 3), 8 * i, np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,c{i % 3}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    count = Counting(monkeypatch)
    _setup(root, tmp_path / "cache", verify_images="full")
    assert count.decodes >= 30 and count.checks == 0  # PIL loads an image more than once while converting
    count.decodes = 0
    _setup(root, tmp_path / "cache", verify_images="off")
    assert count.decodes == 0 and count.checks == 0
