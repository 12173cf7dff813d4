"""WebDataset tar shards (`train-000000.tar`, ...: `key.png` + `key.cls`) as classification samples.

The shards are indexed, not unpacked: setup lists each tar's members (reading only the tiny label
members) and a sample names its image by (shard, byte offset, size), which a worker reads with one
seek. That makes a sharded set an ordinary map-style dataset, so it gets what the other readers get:
the seeded (seed, epoch) order, sharding over processes, and resuming mid-epoch at the very batch
(`ResumableLoader`). WebDataset's own streaming pipeline is an iterable that cannot do the last two,
which is why the index is read here with the stdlib `tarfile`.

A shard's split is its name's prefix (`train-`, `val-`, `test-`) or its folder's name; a split in a
`.json` member (`{"label": ..., "split": ...}`) wins.
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Optional

from mmtune.data.readers import IMAGE_SUFFIXES
from mmtune.data.samples import ImageLabel
from mmtune.data.splits import SPLIT_ALIASES, split_name
from mmtune.data.stored import StoredImage
from mmtune.errors import DataError

LABEL_SUFFIXES = (".cls", ".label", ".txt", ".json")


def _shards(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*.tar"))
    return [path] if path.suffix == ".tar" else []


def is_shard_source(path: Path) -> bool:
    """A `.tar` file, or a folder of `.tar` shards (at its top or in split-named subfolders; it is not
    walked in full, since an image folder may hold a million files)."""
    if not path.is_dir():
        return path.suffix == ".tar"
    top = list(path.iterdir())
    if any(p.suffix == ".tar" for p in top):
        return True
    return any(p.is_dir() and p.name.lower() in SPLIT_ALIASES and any(q.suffix == ".tar" for q in p.iterdir())
               for p in top)


def _split_of(shard: Path, root: Path) -> Optional[str]:
    prefix = re.split(r"[-_.]", shard.name, maxsplit=1)[0].lower()
    if prefix in SPLIT_ALIASES:
        return SPLIT_ALIASES[prefix]
    for part in shard.relative_to(root).parts[:-1] if root.is_dir() else ():
        if part.lower() in SPLIT_ALIASES:
            return SPLIT_ALIASES[part.lower()]
    return None


def _labels(raw: bytes, suffix: str, where: str) -> tuple[tuple[str, ...], Optional[str]]:
    text = raw.decode("utf-8").strip()
    if suffix != ".json":
        return tuple(x.strip() for x in text.split("|") if x.strip()), None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON ({err.msg})") from None
    label = value.get("label", value.get("labels")) if isinstance(value, dict) else value
    split = split_name(value.get("split"), where) if isinstance(value, dict) else None
    if isinstance(label, list):
        return tuple(str(x) for x in label), split
    return ((str(label),) if label is not None else ()), split


def read_shards(source: str) -> list[ImageLabel]:
    """Samples of every shard at `source` (a `.tar`, or a folder of them).

    Raises:
        DataError: a shard that is not a tar file, or an image without a label member (named).
    """
    root = Path(source).expanduser()
    samples = []
    for shard in _shards(root):
        split = _split_of(shard, root)
        images: dict[str, tarfile.TarInfo] = {}
        labels: dict[str, tuple[tuple[str, ...], Optional[str]]] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, dot, ext = member.name.partition(".")  # WebDataset: the key ends at the first dot
                    ext = "." + ext.lower()
                    if ext in IMAGE_SUFFIXES and key not in images:
                        images[key] = member
                    elif ext in LABEL_SUFFIXES and key not in labels:
                        labels[key] = _labels(tar.extractfile(member).read(), ext, f"{shard} {member.name}")
        except tarfile.TarError as err:
            raise DataError(f"{shard}: not a readable tar shard ({err})") from None
        for key, member in images.items():
            where = f"{shard}[{key}]"
            if key not in labels:
                raise DataError(f"{where}: no label member ({key}.cls, .txt or .json) beside {member.name}")
            row, own_split = labels[key]
            samples.append(ImageLabel(where, row, None, own_split or split, where,
                                      image=StoredImage("tar", str(shard), member.name, member.offset_data,
                                                        member.size)))
    if not samples:
        raise DataError(f"no images in the shards at {root}")
    return samples
