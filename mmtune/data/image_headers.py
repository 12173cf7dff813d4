"""A fast image check for large manifests: headers, not pixels, checked once per file version.

Decoding a million images before the first step takes longer than many fits. Instead each file is
opened far enough to read its header (format, size, mode, PIL's pixel limit) and its end is checked
for truncation (a PNG ends with its IEND chunk, a JPEG with the EOI marker; other formats, and a PNG or
JPEG whose end looks wrong, are decoded in full to decide). The verdicts are cached by (path, size,
modification time) in one file per data source, as 64-bit hashes (8 bytes a file), so a second setup
only stats the files; a file that changed has a new key and is checked again.

Threads do the checks: on the network file systems that big archives live on the time is I/O wait,
which threads overlap (PIL's header parsing holds the GIL, so on a local disk two threads help less).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
from PIL import Image

from mmtune.errors import DataError

PNG_END = b"IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"


def file_key(path: str, stat: os.stat_result) -> int:
    """A stable 64-bit key of (path, size, mtime): a changed file gets a new key."""
    digest = hashlib.blake2b(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _ends_whole(path: str, fmt: Optional[str]) -> Optional[bool]:
    """True when the file ends as its format must, False when not, None when the format has no such end."""
    if fmt not in ("PNG", "JPEG"):
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64))
        tail = f.read().rstrip(b"\0")  # some writers pad a JPEG with zeros
    return tail.endswith(PNG_END if fmt == "PNG" else JPEG_END)


def check_header(path: str, full: Callable[[str], None]) -> Optional[str]:
    """Why `path` is not a usable image (None when it is), from its header and its end; `full` (a
    decoder that raises DataError) decides what the header alone cannot."""
    from mmtune.data.images import _check_pixel_count

    try:
        with Image.open(path) as img:
            _check_pixel_count(img, path)
            fmt, width, height = img.format, *img.size
        if width <= 0 or height <= 0:
            return f"cannot read image {path}: empty ({width}x{height})"
        if _ends_whole(path, fmt) is True:
            return None
    except DataError as err:
        return str(err)
    except FileNotFoundError:
        return f"image not found: {path}"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"cannot read image {path}: {err}"
    try:
        full(path)
    except DataError as err:
        return str(err)
    return None


class HeaderCache:
    """The verdicts of earlier checks of one data source: keys of good files, and bad ones with
    their reasons. Stored as a NumPy `.npz` (no pickle)."""

    def __init__(self, file: Optional[Path]) -> None:
        self.file = file
        self.good = np.zeros(0, dtype=np.int64)
        self.bad: dict[int, str] = {}
        if file is not None and file.exists():
            try:
                with np.load(file, allow_pickle=False) as saved:
                    self.good = saved["good"]
                    self.bad = dict(zip(saved["bad_keys"].tolist(), saved["bad_reasons"].tolist()))
            except (OSError, ValueError, KeyError):
                pass  # an unreadable cache is a cold cache

    def known(self, keys: np.ndarray) -> np.ndarray:
        """Which `keys` have a verdict."""
        good = np.isin(keys, self.good) if len(self.good) else np.zeros(len(keys), dtype=bool)
        if self.bad:
            good |= np.isin(keys, np.fromiter(self.bad, dtype=np.int64, count=len(self.bad)))
        return good

    def save(self, keys: np.ndarray, verdicts: dict[int, Optional[str]]) -> None:
        """Keeps the verdicts of this source's current files (`keys`), the new ones included; entries
        of files no longer listed (or changed) are dropped."""
        if self.file is None:
            return
        for key, reason in verdicts.items():
            if reason:
                self.bad[key] = reason
        bad = {k: self.bad[k] for k in np.unique(keys).tolist() if k in self.bad}
        new_good = np.fromiter((k for k, r in verdicts.items() if not r), dtype=np.int64)
        good = np.union1d(self.good[np.isin(self.good, keys)], new_good)
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(self.file.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, good=good, bad_keys=np.array(list(bad), dtype=np.int64),
                 bad_reasons=np.array(list(bad.values()), dtype=str))
        os.replace(tmp, self.file)


def cache_file(source: str, folder: Optional[str]) -> Optional[Path]:
    """Where the header verdicts of `source` are kept: `folder` (or `$MMTUNE_CACHE`, else
    `~/.cache/mmtune`)/image_headers/<hash of the source's absolute path>.npz; None when `folder` is `off`."""
    if folder == "off":
        return None
    root = Path(folder or os.environ.get("MMTUNE_CACHE") or Path.home() / ".cache" / "mmtune").expanduser()
    name = hashlib.sha1(str(Path(source).expanduser().resolve()).encode()).hexdigest()[:20]
    return root / "image_headers" / f"{name}.npz"


def find_bad_headers(paths: Iterable[str], cache: HeaderCache, full: Callable[[str], None],
                     workers: int = 4) -> dict[str, str]:
    """{path: reason} of the unusable images among `paths`, checking only files the cache has no
    verdict for (the others are only stat'ed), and saving the new verdicts."""
    unique = list(dict.fromkeys(paths))
    keys = np.zeros(len(unique), dtype=np.int64)
    bad: dict[str, str] = {}
    for i, path in enumerate(unique):
        try:
            keys[i] = file_key(path, os.stat(path))
        except OSError:
            bad[path] = f"image not found: {path}"
            keys[i] = -1
    known = cache.known(keys)
    todo = [i for i in np.flatnonzero(~known & (keys != -1)).tolist()]
    found: list[Optional[str]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(todo), 4096):  # a slice at a time: one future per file, not a million at once
            found += pool.map(lambda i: check_header(unique[i], full), todo[start:start + 4096])
    verdicts = {int(keys[i]): reason for i, reason in zip(todo, found)}
    for i in np.flatnonzero(known).tolist():
        reason = cache.bad.get(int(keys[i]))
        if reason:
            bad[unique[i]] = reason
    bad.update({unique[i]: reason for i, reason in zip(todo, found) if reason})
    cache.save(keys[keys != -1], verdicts)
    return bad
