"""The aligner from end to end: read both sides, join by key, check, scrub, split, build the DatasetDict
and its report. Each step is a function of another module; this one only orders them and keeps
track of which image and text indices survive."""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
from datasets import Dataset, DatasetDict, DatasetInfo, Features
from datasets.fingerprint import generate_random_fingerprint
from datasets.table import InMemoryTable

from mmtune.data.align import checks
from mmtune.data.align.join import Join, image_keys, join, text_keys
from mmtune.data.align.pii import PIIScrubber
from mmtune.data.align.report import REPORT_FILE, dropped_entry, listing, split_stats, write_report
from mmtune.data.align.sources import ImageTable, TextTable, read_images, read_texts
from mmtune.data.align.spec import RESERVED_COLUMNS, AlignSpec, compile_key_regex
from mmtune.data.splits import SPLIT_ALIASES, SPLIT_NAMES, assign_splits
from mmtune.errors import ConfigError, DataError

log = logging.getLogger("mmtune")


def _read(spec: AlignSpec) -> tuple[ImageTable, TextTable]:
    texts_are_folder = Path(spec.texts).expanduser().is_dir()
    if texts_are_folder:
        if spec.key == "column":
            raise ConfigError(f"key: column needs a text table; {spec.texts} is a folder of .txt files (use key: stem or regex)")
        for option in ("group_column", "split_column"):
            if getattr(spec, option):
                raise ConfigError(f"{option}: {spec.texts} is a folder of .txt files, which has no columns")
    image_key_column = (spec.image_key_column or spec.key_column) if spec.key == "column" else None
    images = read_images(spec.images, spec.image_column, image_key_column)
    columns = None
    if spec.keep_columns is not None:
        columns = {c: "keep_columns" for c in spec.keep_columns}
        columns.update({getattr(spec, o): o for o in ("group_column", "split_column") if getattr(spec, o)})
    texts = read_texts(spec.texts, spec.text_column, None if texts_are_folder else spec.key_column, columns,
                       spec.text_lists)
    for option in ("group_column", "split_column"):
        name = getattr(spec, option)
        if name and name not in texts.columns:
            raise DataError(f"{texts.source}: no column {name!r} ({option}); its columns are "
                            f"{[spec.text_column, *texts.columns]}")
    return images, texts


def _keys(spec: AlignSpec, images: ImageTable, texts: TextTable) -> tuple[list, list]:
    image_rx = text_rx = None
    if spec.key == "regex":
        image_rx = compile_key_regex(spec.image_regex, "image_regex")
        text_rx = compile_key_regex(spec.text_regex, "text_regex") if spec.text_regex else None
    return (image_keys(images, spec.key, image_rx, spec.regex_on),
            text_keys(texts, spec.key, text_rx, spec.regex_on))


def _check(problem: str, check: Callable[[list[str]], dict[int, str]], candidates: Sequence[int],
           values: Sequence, policy: str, where: Callable[[int], str], unit: str, limit: int,
           found_so_far: dict[int, str], dropped: dict) -> None:
    """Runs `check` on the candidates not yet found bad, applies the policy, records what it found."""
    todo = [i for i in candidates if i not in found_so_far]
    local = check([values[i] for i in todo])
    found = {todo[k]: detail for k, detail in sorted(local.items())}
    checks.enforce(problem, found, policy, where)
    dropped[problem] = dropped_entry(found, unit, where, limit)
    found_so_far.update(found)


def _source_split(texts: TextTable, column: str, t: int) -> str:
    value = texts.columns[column][t]
    name = SPLIT_ALIASES.get(str(value).strip().lower()) if value not in (None, "") else None
    if name is None:
        raise DataError(f"{texts.where(t)}: split_column {column!r} is {value!r} (use train, val or test)")
    return name


def _dataset(core: dict[str, list], extra: dict[str, list], texts: TextTable) -> Dataset:
    """One Dataset from column lists.

    Built from Arrow arrays rather than `Dataset.from_dict`: that hashes the whole table to make a
    fingerprint (about 4 s per million rows); a random fingerprint is what `datasets` itself uses
    when hashing is not possible, and saving writes it with the data. Core columns get their type
    up front; kept columns are typed by pyarrow, and one it cannot type is an error naming it.
    """
    arrays = {}
    for name, values in core.items():
        kind = pa.list_(pa.string()) if values and isinstance(values[0], list) else pa.string()
        arrays[name] = pa.array(values, type=kind)
    for name, values in extra.items():
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
            raise DataError(f"{texts.source}: column {name!r} cannot be stored (mixed types?): {err}") from None
    table = pa.Table.from_pydict(arrays)
    info = DatasetInfo(features=Features.from_arrow_schema(table.schema))
    return Dataset(InMemoryTable(table), info=info, fingerprint=generate_random_fingerprint())


def _check_images(spec: AlignSpec, images: ImageTable, candidates: list[int], dropped: dict) -> tuple[dict, list[str]]:
    """Missing, unreadable and duplicate files among `candidates`: {image index: detail}, checks run."""
    image_checks = []
    if spec.check_files and not images.from_folder:  # a folder lists only files that exist
        image_checks.append(("missing_image", checks.missing_files))
    if spec.check_images:
        image_checks.append(("unreadable_image", lambda p: checks.unreadable_images(p, spec.workers)))
    if spec.check_duplicates:
        image_checks.append(("duplicate_image", lambda p: checks.duplicate_files(p, spec.workers)))
    bad: dict[int, str] = {}
    for problem, check in image_checks:
        _check(problem, check, candidates, images.paths, spec.policy.of(problem), images.where, "image",
               spec.examples, bad, dropped)
    return bad, [p for p, _ in image_checks]


def _check_texts(spec: AlignSpec, texts: TextTable, candidates: list[int], dropped: dict) -> tuple[dict, list, dict | None]:
    """Empty texts, PII scrubbing, then over-long texts (measured as they will be written).

    Returns:
        {text index: detail} of bad texts, the texts to write (scrubbed), PII counts (None when off).
    """
    bad: dict[int, str] = {}
    _check("empty_text", checks.empty_texts, candidates, texts.texts, spec.policy.of("empty_text"), texts.where,
           "text", spec.examples, bad, dropped)
    final, pii_counts = texts.texts, None
    if spec.pii.enabled:
        scrub = PIIScrubber(spec.pii.kinds, spec.pii.patterns)
        final = list(texts.texts)
        for t in candidates:
            if t not in bad:
                final[t] = scrub(final[t])
        pii_counts = dict(scrub.counts)
    if spec.max_chars is not None or spec.max_words is not None:
        _check("too_long", lambda ts: checks.too_long_texts(ts, spec.max_chars, spec.max_words), candidates, final,
               spec.policy.of("too_long"), texts.where, "text", spec.examples, bad, dropped)
    return bad, final, pii_counts


def _surviving_rows(joined: Join, bad_texts: dict, bad_images: dict, mode: str) -> tuple[list[int], list, dict]:
    """Output rows as (text index, image index or list of them), and {text: detail} of texts in list
    mode whose images were all dropped."""
    row_text: list[int] = []
    row_image: list[Any] = []
    emptied: dict[int, str] = {}
    for t, imgs in zip(joined.texts, joined.images):
        if t in bad_texts:
            continue
        if bad_images:
            imgs = [i for i in imgs if i not in bad_images]
            if not imgs:
                emptied[t] = "every image of this text was dropped"
                continue
        if mode == "list":
            row_text.append(t)
            row_image.append(imgs)
        else:
            row_text += [t] * len(imgs)
            row_image += imgs
    return row_text, row_image, emptied


def _groups_and_splits(spec: AlignSpec, texts: TextTable, tkeys: list, row_text: list[int]) -> tuple[list, list]:
    """The group of each row (the group column, else the join key) and its split (the source's split
    column, else `assign_splits` by group)."""
    values = texts.columns.get(spec.group_column) if spec.group_column else None
    text_group = {t: str(values[t]) if values is not None and values[t] not in (None, "") else tkeys[t]
                  for t in dict.fromkeys(row_text)}
    groups = [text_group[t] for t in row_text]
    if spec.split_column:
        text_split = {t: _source_split(texts, spec.split_column, t) for t in text_group}
        return groups, [text_split[t] for t in row_text]
    return groups, assign_splits(len(row_text), spec.split, spec.seed, groups)


def _build(spec: AlignSpec, images: ImageTable, texts: TextTable, tkeys: list, final: list, row_text: list[int],
           row_image: list, groups: list, splits: list) -> DatasetDict:
    """Columns in split order, one Arrow table, and each split a contiguous slice of it."""
    by_split: dict[str, list[int]] = {s: [] for s in SPLIT_NAMES}
    for r, s in enumerate(splits):
        by_split[s].append(r)
    order = [r for s in SPLIT_NAMES for r in by_split[s]]
    paths, names, refs = images.paths, images.names, texts.refs
    ordered_text = [row_text[r] for r in order]
    ordered_image = [row_image[r] for r in order]
    if spec.mode == "list":
        ids = [refs[t] for t in ordered_text]
        image_column = [[paths[i] for i in imgs] for imgs in ordered_image]
    else:
        ids = [f"{refs[t]}|{names[i]}" for t, i in zip(ordered_text, ordered_image)]
        image_column = [paths[i] for i in ordered_image]
    extra = spec.keep_columns if spec.keep_columns is not None else [c for c in texts.columns if c not in RESERVED_COLUMNS]
    if "text_index" in texts.columns and "text_index" not in extra:  # which item of a list each text was
        extra = [*extra, "text_index"]
    core = {"id": ids, "key": [tkeys[t] for t in ordered_text], "image": image_column,
            "text": [final[t] for t in ordered_text], "group": [groups[r] for r in order]}
    kept = {name: [texts.columns[name][t] for t in ordered_text] for name in extra}
    full = _dataset(core, kept, texts)
    dataset, start = DatasetDict(), 0
    for s in SPLIT_NAMES:
        size = len(by_split[s])
        # a contiguous range is a zero-copy slice; an empty one must be a list (datasets checks `start`)
        dataset[s] = full.select(range(start, start + size) if size else [])
        start += size
    return dataset


def align_pairs(spec: AlignSpec) -> tuple[DatasetDict, dict]:
    """Joins images and texts, checks every pair, scrubs and splits them.

    Args:
        spec: sources, key, checks, policies, PII scrubbing and split (see `AlignSpec`).

    Returns:
        The DatasetDict (splits `train`, `val`, `test`, each present even when empty; columns `id`,
        `key`, `image` (a path, or a list of paths in `list` mode), `text`, `group`, then the kept
        text-table columns) and the report (a JSON-able dict, see `mmtune.data.align.report`).

    Raises:
        ConfigError: options that cannot work together.
        DataError: unreadable sources, nothing matched, nothing left, or a problem whose policy is `error`.
    """
    with _cyclic_gc_paused():
        return _align(spec)


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector (restoring its state after).

    The aligner creates millions of small lists, strings and dicts that hold no reference cycles, so
    reference counting frees all of them; the cyclic collector would still walk the growing heap
    again and again as they are allocated, which took a quarter of the time of a million-row join.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _align(spec: AlignSpec) -> tuple[DatasetDict, dict]:
    spec.validate()
    images, texts = _read(spec)
    ikeys, tkeys = _keys(spec, images, texts)
    joined = join(ikeys, tkeys)
    if not joined.texts:
        some_i = sorted({k for k in ikeys[:1000] if k is not None})[:3]
        some_t = sorted({k for k in tkeys[:1000] if k is not None})[:3]
        raise DataError(f"no image matched a text by key {spec.key!r} ({len(images.paths)} images, {len(texts.texts)} "
                        f"texts): image keys look like {some_i}, text keys like {some_t}")
    dropped: dict[str, dict] = {}
    matched_images = sorted({i for imgs in joined.images for i in imgs})
    bad_images, checks_run = _check_images(spec, images, matched_images, dropped)
    bad_texts, final, pii_counts = _check_texts(spec, texts, joined.texts, dropped)
    checks_run += ["empty_text"] + (["too_long"] if "too_long" in dropped else [])
    row_text, row_image, emptied = _surviving_rows(joined, bad_texts, bad_images, spec.mode)
    if spec.mode == "list" or emptied:  # texts whose every image was dropped: every text read is accounted for
        dropped["no_images_left"] = dropped_entry(emptied, "text", texts.where, spec.examples)
    if not row_text:
        reasons = ", ".join(f"{v['count']} {k}" for k, v in dropped.items() if v["count"])
        raise DataError(f"{joined.pairs} pair(s) matched but every one was dropped ({reasons}); see the policy settings")
    groups, splits = _groups_and_splits(spec, texts, tkeys, row_text)
    dataset = _build(spec, images, texts, tkeys, final, row_text, row_image, groups, splits)

    split_summary, crossing = split_stats(splits, groups)
    if crossing:
        log.warning("%d group(s) appear in several splits of %s's column %r", crossing, texts.source, spec.split_column)
    limit = spec.examples
    report = {
        "images_source": str(images.source), "texts_source": str(texts.source), "key": spec.key, "mode": spec.mode,
        "images": len(images.paths), "texts": len(texts.texts),
        "matched": {"pairs": joined.pairs, "images": len(matched_images), "texts": len(joined.texts)},
        "unmatched_images": listing(joined.unmatched_images, lambda i: {"where": images.where(i), "key": ikeys[i]}, limit),
        "unmatched_texts": listing(joined.unmatched_texts, lambda t: {"where": texts.where(t), "key": tkeys[t]}, limit),
        "checks": checks_run,
        "dropped": dropped,
        "pii": pii_counts,
        "rows": len(row_text),
        "columns": dataset["train"].column_names,
        "splits": split_summary,
        "groups_in_several_splits": crossing,
    }
    return dataset, report


def save_aligned(dataset: DatasetDict, report: dict, out: str) -> Path:
    """Writes the DatasetDict (`save_to_disk`) and `align_report.json` into `out`; returns the report path."""
    out_dir = Path(out).expanduser()
    # an empty split saved with the default zero shards cannot be loaded back (datasets 5.2): give it one
    empty = {name: 1 for name, split in dataset.items() if len(split) == 0}
    dataset.save_to_disk(str(out_dir), num_shards=empty or None)
    return write_report(report, out_dir / REPORT_FILE)


def align_to_disk(spec: AlignSpec, out: str) -> tuple[DatasetDict, dict, Path]:
    """`align_pairs` then `save_aligned`: the data set, the report, and where the report was written."""
    dataset, report = align_pairs(spec)
    return dataset, report, save_aligned(dataset, report, out)

