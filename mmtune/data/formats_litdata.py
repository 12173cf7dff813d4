"""Lightning `litdata` optimized chunks, streamed from local disk or object storage, as classification samples.

A set written by `litdata.optimize` (`tools/make_litdata.py` writes one from any source mmtune reads) is
a folder per split (`train/`, `val/`, `test/`), each an `index.json` and `chunk-*.bin` files; the root may
be a local folder or a URL litdata streams from (`s3://`, `gs://`, `azure://`, `r2://`, `hf://`, or
`local:/path`, a local folder read through the cache as a remote one would be). Chunks are fetched into a
local cache that litdata keeps under `max_cache_size`, evicting chunks it has read, so a set larger than
the disk trains through a bounded cache.

Streaming, shuffling by chunk, sharding over processes and workers, and mid-epoch resume
(`StreamingDataLoader.state_dict`) are litdata's; what is written here is the step from a stored item
(`{"image": <encoded bytes>, "label": <name, "a|b" or index>, ...}`) to mmtune's standard batch item, with
the same decoding (`images.to_model_mode`) and transforms as every other classification source.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Optional

import torch
from litdata import StreamingDataLoader, StreamingDataset
from PIL import Image

from mmtune.data.images import HighBitPolicy, to_model_mode
from mmtune.data.samplers import seed_everything_from
from mmtune.data.samples import ImageLabel
from mmtune.errors import DataError

CLASSES_FILE = "classes.json"  # {"classes": [...], "multi_label": bool, "counts": {split: {class: n}}}
REMOTE_PREFIXES = ("s3://", "gs://", "azure://", "r2://", "hf://", "local:")
# litdata's serializers that unpickle: a data set a user was handed must never run code
UNSAFE_FORMATS = ("pickle", "graph")


def is_remote(root: str) -> bool:
    return root.startswith(REMOTE_PREFIXES)


def split_dir(root: str, split: str) -> str:
    return root.rstrip("/") + "/" + split


def read_classes_file(root: str, cache_dir: Optional[str], storage_options: Optional[dict]) -> Optional[dict]:
    """The root's `classes.json` (written by `tools/make_litdata.py`), fetched with litdata's own
    downloader when the root is a URL; None when there is none."""
    if not is_remote(root):
        path = Path(root).expanduser() / CLASSES_FILE
        return json.loads(path.read_text()) if path.is_file() else None
    from litdata.streaming.downloader import get_downloader

    name = hashlib.sha256(root.encode()).hexdigest()[:16]
    local = Path(cache_dir or Path.home() / ".cache" / "mmtune" / "litdata") / f"classes-{name}.json"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.unlink(missing_ok=True)  # the downloaders keep a file that is there: never a stale list
    try:
        get_downloader(root, str(local.parent), [], storage_options).download_file(
            split_dir(root, CLASSES_FILE), str(local))
    except Exception:  # no classes.json there (each storage client raises its own error)
        return None
    return json.loads(local.read_text()) if local.is_file() else None


def open_split(root: str, split: str, cache_dir: Optional[str], max_cache_size: Optional[str],
               storage_options: Optional[dict], seed: int, **kwargs) -> "StreamingImageDataset":
    """The split's streaming dataset; a folder with no litdata index is a one-line DataError naming it."""
    where = split_dir(root, split)
    if not is_remote(root):
        local = Path(where).expanduser()
        if not (local / "index.json").is_file():
            raise DataError(f"{local}: no litdata index.json (write the set with tools/make_litdata.py or litdata.optimize)")
        _check_local_chunks(local)
        where = str(local)
    try:
        dataset = StreamingImageDataset(where, cache_dir=cache_dir, max_cache_size=max_cache_size,
                                        storage_options=storage_options, seed=seed, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{where}: not a readable litdata set ({str(err).splitlines()[0]})") from None
    if len(dataset) == 0:
        raise DataError(f"{where}: the litdata set has no samples (no chunks)")
    return dataset


def _check_local_chunks(folder: Path) -> None:
    """A local set's index names chunks that are there (a missing one would fail mid-epoch in a worker)."""
    try:
        chunks = json.loads((folder / "index.json").read_text()).get("chunks")
    except json.JSONDecodeError as err:
        raise DataError(f"{folder / 'index.json'}: not a litdata index (invalid JSON: {err.msg})") from None
    if not isinstance(chunks, list) or not chunks:
        raise DataError(f"{folder / 'index.json'}: the litdata index lists no chunks")
    missing = [c.get("filename") for c in chunks if not (folder / str(c.get("filename"))).is_file()]
    if missing:
        raise DataError(f"{folder / missing[0]}: a chunk the index lists is missing ({len(missing)} of {len(chunks)})")


class StreamingImageDataset(StreamingDataset):
    """A litdata `StreamingDataset` whose items are mmtune's classification items:
    {"pixels", "target" (when classes are known), "index" (the global sample index), "sample_id"}.

    `decoder` (set by the data module once the task has given the model's input config) turns a stored
    item into one; until then items are returned as stored. Augmentations are seeded from
    (seed, epoch, sample index), so a resumed epoch augments each sample as the uninterrupted run did.
    """

    def __init__(self, input_dir: str, *args, **kwargs) -> None:
        super().__init__(input_dir, *args, **kwargs)
        self.decoder: Optional["ItemDecoder"] = None
        self._check_formats()

    def _check_formats(self) -> None:
        """Refuses a set that stores pickled objects (litdata's `pickle`/`graph` serializers unpickle on read)."""
        config = self._index_config()
        unsafe = [f for f in config.get("data_format", []) if str(f).split(":")[0] in UNSAFE_FORMATS]
        if unsafe:
            raise DataError(f"{self.input_dir.url or self.input_dir.path}: items stored as {unsafe[0]!r} would be "
                            "unpickled (code could run); store images as bytes and labels as str/int")

    def _index_config(self) -> dict:
        """The `config` of the split's index.json (litdata has fetched it into `input_dir.path` by now);
        without it nothing would be known of how items are stored, so it is refused."""
        index = Path(self.input_dir.path or "") / "index.json"
        if not index.is_file():
            raise DataError(f"{self.input_dir.url or self.input_dir.path}: no litdata index.json to check the items' formats")
        return json.loads(index.read_text()).get("config", {})

    @property
    def samples(self) -> "StreamedSamples":
        """The split's rows as `ImageLabel`s, read on demand (the task's per-sample records ask for the
        validation and test rows it scored)."""
        return StreamedSamples(self)

    def where(self, position: int) -> str:
        return f"{self.input_dir.url or self.input_dir.path}[{position}]"

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        if self.decoder is None or not isinstance(item, dict):
            return item
        position = int(getattr(index, "index", index))
        if self.decoder.augments:
            seed_everything_from(self.decoder.seed, self.current_epoch, position)
        return self.decoder(item, position, self.where(position))


class StreamedSamples(Sequence):
    """A streamed split's rows by sample index, as `ImageLabel`s (labels, and the item's `id` as origin).
    A row is read when asked for, from the chunk cache (its chunk was streamed for the batch it was in);
    a streamed set is never read whole."""

    def __init__(self, dataset: StreamingImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int) -> ImageLabel:
        item = StreamingDataset.__getitem__(self.dataset, int(position))  # the stored item, not decoded
        where, decoder = self.dataset.where(int(position)), self.dataset.decoder
        labels = decoder.labels(item[decoder.label_key], where) if decoder and decoder.label_key in item else []
        return ImageLabel(where, tuple(labels), origin=str(item.get("id", where)))


class StreamingLoader(StreamingDataLoader):
    """litdata's `StreamingDataLoader`, whose resumed epoch also ends when Lightning stops asking.

    After `load_state_dict` litdata replays the saved position and clears its `restore` flag only when
    the epoch's iterator runs to its end; Lightning takes `len(loader)` batches from a sized loader and
    never exhausts it, so the epoch after a resumed one would replay the resumed state (the same order
    again) instead of starting the next epoch's. The flag is cleared here once the resumed epoch has
    handed out all its samples, which is the state litdata itself reaches at an epoch's end.
    """

    def __iter__(self):
        if self.restore and isinstance(self.dataset, StreamingDataset) \
                and self._num_samples_yielded_streaming >= len(self.dataset):
            self.restore = False
        yield from super().__iter__()


class ItemDecoder:
    """A stored item -> mmtune's item (picklable: it travels to the DataLoader workers with the dataset).

    Args:
        transform: PIL image -> tensor (`transforms.build_transform`).
        classes: the class list (label names, or the names of integer labels); None leaves out `target`.
        multi_label: multi-hot targets.
        channels: 1 (L) or 3 (RGB).
        high_bit: how 16-bit images become 8-bit.
        image_key, label_key: the item's fields.
        separator: multi-label separator of a string label.
        seed: augmentation seed; `augments` says whether the transform draws random numbers.
    """

    def __init__(self, transform, classes: Optional[list[str]], multi_label: bool, channels: int,
                 high_bit: HighBitPolicy, image_key: str, label_key: str, separator: str, seed: int,
                 augments: bool) -> None:
        self.transform, self.classes, self.multi_label = transform, classes, multi_label
        self.index = {c: i for i, c in enumerate(classes)} if classes is not None else None
        self.channels, self.high_bit = channels, high_bit
        self.image_key, self.label_key, self.separator = image_key, label_key, separator
        self.seed, self.augments = seed, augments

    def labels(self, value: Any, where: str) -> list[str]:
        if isinstance(value, (list, tuple)):
            return [n for v in value for n in self.labels(v, where)]
        if isinstance(value, torch.Tensor):
            return self.labels(value.tolist(), where)
        if isinstance(value, (int,)) and not isinstance(value, bool):
            if not 0 <= value < len(self.classes):
                raise DataError(f"{where}: label index {value} is outside the {len(self.classes)} classes")
            return [self.classes[value]]
        names = [x.strip() for x in str(value).split(self.separator) if x.strip()]
        for name in names:
            if name not in self.index:
                raise DataError(f"{where}: label {name!r} is not in the class list {self.classes}")
        return names

    def __call__(self, item: dict, position: int, where: str) -> dict:
        if self.image_key not in item:
            raise DataError(f"{where}: no {self.image_key!r} field (the item has {sorted(item)}; set data.image_key)")
        raw = item[self.image_key]
        try:
            img = raw if isinstance(raw, Image.Image) else Image.open(io.BytesIO(bytes(raw)))
            img.load()
        except Exception as err:  # PIL's own error: name the sample instead
            raise DataError(f"cannot read image {where}: {err}") from None
        out = {"pixels": self.transform(to_model_mode(img, self.channels, self.high_bit)), "index": position,
               "sample_id": str(item.get("id", where))}
        if self.index is not None:
            if self.label_key not in item:
                raise DataError(f"{where}: no {self.label_key!r} field (the item has {sorted(item)}; set data.label_key)")
            names = self.labels(item[self.label_key], where)
            if self.multi_label:
                target = torch.zeros(len(self.index))
                target[[self.index[c] for c in names]] = 1.0
            else:
                if len(names) != 1:
                    raise DataError(f"{where}: multi-class data needs exactly one label per image, got {names}")
                target = torch.tensor(self.index[names[0]])
            out["target"] = target
        return out
