"""Checks of single images and texts, and the drop-or-stop policy applied to what they find.

Each check takes plain lists and returns {index: detail} for the items with the problem, so the
caller decides what an index means (an image file, a text) and the policy stays in one place.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from mmtune.data.images import find_unreadable
from mmtune.errors import DataError

# Below this many requested files in one directory a stat per file is cheaper than listing it.
_LIST_DIR_FROM = 16


def missing_files(paths: Sequence[str]) -> dict[int, str]:
    """{index: detail} of the paths that are not existing files.

    A stat per file is about a microsecond locally but far more on network storage, and a million
    stats add up; listing each directory once (`os.scandir` returns names and types together) checks
    all its files in a few calls. Names absent from a listing are confirmed with a stat, so a
    case-insensitive file system or a link gives the same answer as `os.path.isfile`.
    """
    by_dir: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for i, p in enumerate(paths):
        folder, name = os.path.split(p)
        by_dir[folder].append((i, name))
    missing: dict[int, str] = {}
    for folder, items in by_dir.items():
        if len(items) < _LIST_DIR_FROM:
            missing.update((i, "file not found") for i, _ in items if not os.path.isfile(paths[i]))
            continue
        try:
            with os.scandir(folder or ".") as entries:
                files = {e.name for e in entries if e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            missing.update((i, "file not found") for i, _ in items)
            continue
        except OSError:
            files = set()
        missing.update((i, "file not found") for i, name in items
                       if name not in files and not os.path.isfile(paths[i]))
    return missing


def unreadable_images(paths: Sequence[str], workers: int = 4) -> dict[int, str]:
    """{index: reason} of the images that do not decode (decoded in a thread pool; PIL releases the GIL)."""
    bad = find_unreadable(paths, workers=workers)
    return {i: bad[p] for i, p in enumerate(paths) if p in bad}


def _digest(path: str) -> Optional[bytes]:
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None  # not readable as bytes: not a duplicate of anything (check_images reports it)
    return h.digest()


def duplicate_files(paths: Sequence[str], workers: int = 4) -> dict[int, str]:
    """{index: detail} of files with the same bytes as an earlier path in `paths` (the first copy is
    kept). Hashes with blake2b in a thread pool (hashlib releases the GIL on large buffers)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        digests = list(pool.map(_digest, paths, chunksize=64))
    first: dict[bytes, int] = {}
    dupes = {}
    for i, d in enumerate(digests):
        if d is None:
            continue
        j = first.setdefault(d, i)
        if j != i:
            dupes[i] = f"same bytes as {paths[j]}"
    return dupes


def empty_texts(texts: Sequence[Optional[str]]) -> dict[int, str]:
    """{index: detail} of texts that are missing, empty or only whitespace."""
    return {i: "empty text" for i, t in enumerate(texts) if not t or t.isspace()}


def too_long_texts(texts: Sequence[str], max_chars: Optional[int] = None, max_words: Optional[int] = None) -> dict[int, str]:
    """{index: detail} of texts over `max_chars` characters or `max_words` words."""
    out = {}
    if max_chars is not None:
        out.update((i, f"{len(t)} characters > max_chars {max_chars}") for i, t in enumerate(texts) if len(t) > max_chars)
    if max_words is not None:
        for i, t in enumerate(texts):
            # more than max_words words take at least 2 * max_words + 1 characters: skip texts too short to be over
            if i not in out and len(t) > 2 * max_words:
                words = len(t.split())
                if words > max_words:
                    out[i] = f"{words} words > max_words {max_words}"
    return out


def enforce(problem: str, found: dict[int, str], policy: str, where: Callable[[int], str]) -> None:
    """Stops the run when `problem` has policy `error` and was found.

    Args:
        problem: the problem's name (`missing_image`, ...).
        found: {index: detail} from a check.
        policy: `drop` or `error`.
        where: index -> the file or row it comes from.

    Raises:
        DataError: naming up to five of the files or rows, and the setting that would drop them.
    """
    if policy != "error" or not found:
        return
    shown = "; ".join(f"{where(i)}: {detail}" for i, detail in list(found.items())[:5])
    more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
    raise DataError(f"{len(found)} {problem.replace('_', ' ')} problem(s) with policy.{problem}: error "
                    f"(set it to drop to skip them): {shown}{more}")
