"""Reading the two sides of the join into column lists: image files (a folder or a manifest) and texts
(a table or a folder of `.txt` files).

Columns are plain Python lists, not one object per row, and paths are handled as strings with
`os.path`: at a million rows `pathlib` objects and per-row dataclasses cost seconds that buy nothing.
Every row keeps its line number so that errors and the report can name it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from mmtune.data.readers import IMAGE_SUFFIXES, _rows
from mmtune.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


@dataclass
class ImageTable:
    """Image files in source order.

    Attributes:
        source: the folder or manifest they came from.
        names: path relative to the folder, or as written in the manifest (what a `path` regex sees).
        paths: the path to open (a manifest's relative paths resolved against its folder).
        lines: manifest row of each image (None for a folder).
        key_values: the manifest's key column, when the key is a column.
    """

    source: Path
    names: list[str]
    paths: list[str]
    lines: Optional[list[int]] = None
    key_values: Optional[list[Optional[str]]] = None

    @property
    def from_folder(self) -> bool:
        return self.lines is None

    def where(self, i: int) -> str:
        """Where image `i` is named, for messages (`images.csv row 4: /data/a.png`)."""
        if self.lines is None:
            return self.paths[i]
        return f"{self.source} {_unit(self.source)} {self.lines[i]}: {self.paths[i]}"


@dataclass
class TextTable:
    """Texts in source order.

    Attributes:
        source: the table or folder they came from.
        texts: each text, stripped (None when the row has no value).
        key_values: the key column's value, or the `.txt` file's path relative to the folder.
        refs: a short unique reference per text (`reports.csv:12`, `p1/s1.txt`), used in row ids.
        lines: table row of each text (None for a folder).
        columns: the other columns read from a table, name -> values.
    """

    source: Path
    texts: list[Optional[str]]
    key_values: list[Optional[str]]
    refs: list[str]
    lines: Optional[list[int]] = None
    columns: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def from_folder(self) -> bool:
        return self.lines is None

    def where(self, i: int) -> str:
        """Where text `i` comes from, for messages (`reports.csv row 12`, or the `.txt` path)."""
        if self.lines is None:
            return str(self.source / self.refs[i])
        return f"{self.source} {_unit(self.source)} {self.lines[i]}"


def _unit(path: Path) -> str:
    return "row" if path.suffix.lower() in (".csv", ".tsv") else "line"


def _exists(source: str, what: str) -> Path:
    path = Path(source).expanduser().absolute()  # output paths work from any working directory
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if path.is_file() and path.suffix.lower() not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported {what} type {path.suffix!r} (use a folder, or {', '.join(TABLE_SUFFIXES)})")
    return path


def _walk(root: Path, suffixes: Sequence[str]) -> list[str]:
    """Sorted relative paths (with `/`) of files under `root` whose suffix is in `suffixes`.

    `os.walk` rather than `Path.rglob`: it yields plain strings and is several times faster on large trees.
    """
    out = []
    base = str(root)
    for folder, dirs, files in os.walk(base):
        dirs.sort()
        rel = os.path.relpath(folder, base)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        out += [prefix + f for f in files if os.path.splitext(f)[1].lower() in suffixes]
    out.sort()
    return out


def _value(value: Any) -> Optional[str]:
    """A key or path cell as a string; empty cells are None."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def read_images(source: str, image_column: str = "path", key_column: Optional[str] = None) -> ImageTable:
    """Reads image files from a folder (recursively) or a manifest.

    Args:
        source: folder or manifest path.
        image_column: manifest column with the image path (relative to the manifest or absolute).
        key_column: manifest column to read as the join key (for `key: column`).

    Raises:
        DataError: the source is missing or empty, a manifest lacks a column, or a row has no path.
    """
    root = _exists(source, "image source")
    if root.is_dir():
        if key_column:
            raise DataError(f"{root} is a folder; a key column ({key_column!r}) needs an image manifest")
        names = _walk(root, IMAGE_SUFFIXES)
        if not names:
            raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
        base = str(root)
        return ImageTable(root, names, [os.path.join(base, n) for n in names])
    names, lines, keys = [], [], []
    base = str(root.parent)
    for line, row in _rows(root):
        if not isinstance(row, dict):
            raise DataError(f"{root} {_unit(root)} {line}: expected an object with {image_column!r}, got {row!r}")
        name = _value(row.get(image_column))
        if name is None:
            raise DataError(f"{root} {_unit(root)} {line}: no {image_column!r} value (columns: {list(row)})")
        names.append(name)
        lines.append(line)
        if key_column:
            if key_column not in row:
                raise DataError(f"{root} {_unit(root)} {line}: no key column {key_column!r} (columns: {list(row)})")
            keys.append(_value(row[key_column]))
    if not names:
        raise DataError(f"no rows in {root}")
    prefix = os.path.join(base, "")  # plain concatenation: os.path.join per row costs a second per million
    isabs, expanduser = os.path.isabs, os.path.expanduser
    paths = [n if isabs(n) else prefix + n for n in (expanduser(n) if n[:1] == "~" else n for n in names)]
    return ImageTable(root, names, paths, lines, keys if key_column else None)


def _text_cell(text: Any, where: str, column: str, lists: str) -> tuple[Optional[list[str]], bool]:
    """A text cell as (its texts, whether they came from a list): one for a string, one per item for
    a list (a JSON list, or a CSV cell holding a list literal such as a Hugging Face export's
    `['a cat', 'a dog']`); None when empty.

    Raises:
        DataError: a number, boolean or object (never turned into text silently), or a list while
            `lists` is `error` (saying how to take one pair per item).
    """
    if text is None:
        return None, False
    items = None
    if isinstance(text, str):
        stripped = text.strip()
        if stripped[:1] == "[" and stripped[-1:] == "]":
            items = _list_literal(stripped)
        if items is None:
            return [stripped], False
    elif isinstance(text, (list, tuple)):
        items = list(text)
    else:
        raise DataError(f"{where}: field {column!r} must be text, got a {type(text).__name__} ({str(text)[:60]}); "
                        "quote it in the source if it is meant as text")
    bad = next((x for x in items if not isinstance(x, str)), None)
    if bad is not None:
        raise DataError(f"{where}: field {column!r} is a list holding a {type(bad).__name__} ({str(bad)[:60]}); "
                        "a text list must hold only strings")
    if lists == "error":
        raise DataError(f"{where}: field {column!r} holds a list of {len(items)} texts; set text_lists: explode "
                        "(--text_lists explode) for one pair per text (its position kept in the text_index column), "
                        "or give one text per row")
    return [x.strip() for x in items], True


def _list_literal(text: str) -> Optional[list]:
    """The list a JSON or Python list literal spells (strings only matter), or None if it is not one."""
    import ast
    import json

    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = ast.literal_eval(text)  # literals only: never runs code
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    return value if isinstance(value, list) and value else None


def read_texts(source: str, text_column: str = "text", key_column: Optional[str] = "id",
               columns: Optional[Mapping[str, str]] = None, lists: str = "error") -> TextTable:
    """Reads texts from a table or a folder of `.txt` files.

    Args:
        source: table or folder path.
        text_column: table column with the text.
        key_column: table column with the join key (None: no key column).
        columns: table columns to read besides the text, each with the option that asks for it (named
            when the column is missing); None reads every column.
        lists: a cell holding a list of texts: `error` refuses it (saying how), `explode` makes one
            text per item, with its position in a `text_index` column (and `#i` in its ref).

    Raises:
        DataError: the source is missing or empty, a table has no such text/key/kept column, a `.txt`
            file is not UTF-8, or a text cell is not text (a number, an object, a list under `error`).
    """
    root = _exists(source, "text source")
    if root.is_dir():
        refs = _walk(root, (".txt",))
        if not refs:
            raise DataError(f"no .txt files under {root}")
        texts = []
        for ref in refs:
            try:
                texts.append((root / ref).read_text(encoding="utf-8").strip())
            except UnicodeDecodeError as err:
                raise DataError(f"{root / ref}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        return TextTable(root, texts, list(refs), list(refs))
    texts, keys, lines, item_index = [], [], [], []
    wanted = None if columns is None else dict(columns)
    values_of: dict[str, list] = {} if wanted is None else {c: [] for c in wanted}
    seen: dict[str, None] = {}  # every column name met, in order (JSONL rows may differ)
    n = 0
    for line, row in _rows(root):
        if not isinstance(row, dict):
            raise DataError(f"{root} {_unit(root)} {line}: expected an object with {text_column!r}, got {row!r}")
        if not seen.keys() >= row.keys():
            for name in row:
                if name not in seen:
                    seen[name] = None
                    if wanted is None and name != text_column:
                        values_of[name] = [None] * n  # a column first met on a later JSONL line
        cell, from_list = _text_cell(row.get(text_column), f"{root} {_unit(root)} {line}", text_column, lists)
        for i, text in enumerate(cell if cell is not None else [None]):
            texts.append(text)
            keys.append(_value(row.get(key_column)) if key_column else None)
            lines.append(line)
            item_index.append(i if from_list else None)
            for name, values in values_of.items():
                values.append(row.get(name))
            n += 1
    if not n:
        raise DataError(f"no rows in {root}")
    for needed, option in ((text_column, "text_column"), (key_column, "key_column"), *(wanted or {}).items()):
        if needed and needed not in seen:
            raise DataError(f"{root}: no column {needed!r} ({option}); its columns are {list(seen)}")
    name = root.name
    refs = [f"{name}:{line}" if i is None else f"{name}:{line}#{i}" for line, i in zip(lines, item_index)]
    if any(i is not None for i in item_index):
        if "text_index" in values_of:
            raise DataError(f"{root}: a column is named 'text_index', which text_lists: explode writes; rename it")
        values_of["text_index"] = item_index
    return TextTable(root, texts, keys, refs, lines, values_of)
