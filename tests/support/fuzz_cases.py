"""Seeded broken inputs for every data reader, and the judge of what each reader did with them.

A case writes its files into a fresh folder and calls one reader the way its data module does (the
module's `setup`, and `connect` with a tiny tokenizer where rows are dropped at tokenization). Its
outcome is one of:

- `named error`: an `MMTuneError` whose one-line message names the file (and the row or key where
  the case says so);
- `counted skip`: the reader went on, and rows in = rows used + rows listed (or counted) as skipped,
  each with a reason;
- `read correctly`: every row was used (odd but valid input: 1x1 images, BOMs, numbers as labels);
- `defect`: anything else (another exception, a vague or multi-line error, a lost row, a hang, or
  an outcome the case does not allow, such as a good image skipped).

`tests/test_fuzz_inputs.py` runs every case; `tools/fuzz_inputs.py` prints the counts per reader.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import traceback
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from PIL import Image

from mmtune.errors import MMTuneError

SEED = 20260511
TIMEOUT_S = 30
NAMED, SKIP, READ, DEFECT = "named error", "counted skip", "read correctly", "defect"
ERROR_OR_SKIP = frozenset({NAMED, SKIP})


@dataclass
class Trial:
    """What a case built: the call, how many rows went in, what a named error must mention, and
    which outcomes are right for it."""

    run: Callable[[], tuple[int, dict[str, str]]]  # -> (rows used, {skipped row: reason})
    rows_in: int
    files: tuple[str, ...]  # a named error names at least one of these (file or folder names)
    allowed: frozenset = ERROR_OR_SKIP
    keys: tuple[str, ...] = ()  # ... and every one of these (row, key)


@dataclass
class Case:
    reader: str
    name: str
    make: Callable[[Path], Trial]

    @property
    def id(self) -> str:
        return f"{self.reader}:{self.name}"


@dataclass
class Outcome:
    kind: str
    detail: str = ""
    wanted: frozenset = field(default_factory=frozenset)


class CaseTimeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raises CaseTimeout in the main thread after `seconds` (a reader that hangs is a defect)."""
    def fire(signum, frame):
        raise CaseTimeout(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def judge(case: Case, folder: Path) -> Outcome:
    """Builds the case in `folder`, runs it and classifies what happened."""
    trial = case.make(folder)
    try:
        with time_limit(TIMEOUT_S):
            used, skipped = trial.run()
    except MMTuneError as err:
        message = str(err)
        problems = []
        if "\n" in message.strip():
            problems.append("the message spans several lines")
        if not any(f in message for f in trial.files):
            problems.append(f"it names none of {list(trial.files)}")
        problems += [f"it does not name {k!r}" for k in trial.keys if k not in message]
        if problems:
            return Outcome(DEFECT, f"vague {type(err).__name__}: {'; '.join(problems)}: {message[:300]}")
        kind = NAMED
        detail = message[:300]
    except CaseTimeout as err:
        return Outcome(DEFECT, f"hang: {err}")
    except Exception as err:  # noqa: BLE001  (any other exception is the defect this test looks for)
        where = traceback.extract_tb(err.__traceback__)[-1]
        return Outcome(DEFECT, f"uncaught {type(err).__name__} at {Path(where.filename).name}:{where.lineno}: "
                               f"{str(err)[:300]}")
    else:
        if used + len(skipped) != trial.rows_in:
            return Outcome(DEFECT, f"rows lost: {trial.rows_in} in, {used} used, {len(skipped)} skipped")
        if not all(skipped.values()):
            return Outcome(DEFECT, "a skipped row has no reason")
        kind = SKIP if skipped else READ
        detail = f"{trial.rows_in} in, {used} used, {len(skipped)} skipped" + (
            f" (e.g. {next(iter(skipped.values()))[:200]})" if skipped else "")
    if kind not in trial.allowed:
        return Outcome(DEFECT, f"{kind} where {sorted(trial.allowed)} was right: {detail}", trial.allowed)
    return Outcome(kind, detail, trial.allowed)


# ---- images ----------------------------------------------------------------------------------------
def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` grayscale pixels, with a few rows of data: PIL
    refuses it at open past twice `Image.MAX_IMAGE_PIXELS` (a decompression bomb), and finds it
    truncated between one and two times the limit."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def _noise(rng: random.Random, w: int, h: int, mode: str = "RGB") -> Image.Image:
    arr = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def good_png(rng: random.Random) -> bytes:
    return _png_bytes(_noise(rng, 8, 8))


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _palette_transparent(rng: random.Random) -> bytes:
    img = _noise(rng, 8, 8).convert("P")
    img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


# name -> (suffix, bytes maker or a link/dir kind, good?)
GOOD_IMAGES: dict[str, tuple[str, Callable[[random.Random], bytes]]] = {
    "1x1 png": (".png", lambda r: _png_bytes(_noise(r, 1, 1))),
    "20000x2 png": (".png", lambda r: _png_bytes(_noise(r, 20000, 2))),
    "2x20000 png": (".png", lambda r: _png_bytes(_noise(r, 2, 20000))),
    "16-bit grayscale png": (".png", lambda r: _png_bytes(Image.fromarray(
        np.random.default_rng(r.randrange(1 << 30)).integers(0, 4095, (8, 8), dtype=np.uint16)))),
    "RGBA png": (".png", lambda r: _png_bytes(_noise(r, 8, 8, "RGBA"))),
    "palette png with transparency": (".png", _palette_transparent),
    "CMYK jpeg": (".jpg", lambda r: _encoded(_noise(r, 8, 8, "CMYK"), "JPEG")),
    "float tiff": (".tif", lambda r: _encoded(Image.fromarray(
        np.random.default_rng(r.randrange(1 << 30)).random((8, 8), dtype=np.float32)), "TIFF")),
    "grayscale gif": (".gif", lambda r: _encoded(_noise(r, 8, 8, "L"), "GIF")),
}
BAD_IMAGES: dict[str, tuple[str, Any]] = {
    "zero-byte png": (".png", lambda r: b""),
    "truncated png": (".png", lambda r: (lambda b: b[: len(b) // 2])(_png_bytes(_noise(r, 32, 32)))),
    "truncated jpeg": (".jpg", lambda r: (lambda b: b[: len(b) // 3])(_encoded(_noise(r, 64, 64), "JPEG"))),
    "text named .png": (".png", lambda r: b"this is not an image\n"),
    "random bytes": (".webp", lambda r: bytes(r.randrange(256) for _ in range(300))),
    "decompression bomb past the pixel limit": (".png", lambda r: bomb_png(40000, 40000)),
    "bomb between one and two pixel limits": (".png", lambda r: bomb_png(10000, 10000)),
    "symlink loop": (".png", "loop"),
    "symlink to itself": (".png", "self"),
    "dangling symlink": (".png", "dangling"),
    "folder named .png": (".png", "dir"),
}


def place_image(folder: Path, stem: str, kind: str, rng: random.Random) -> Path:
    """Writes image `kind` (a GOOD_IMAGES or BAD_IMAGES name, or `good`) as `folder/stem<suffix>`."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "good":
        path = folder / f"{stem}.png"
        path.write_bytes(good_png(rng))
        return path
    suffix, make = GOOD_IMAGES.get(kind) or BAD_IMAGES[kind]
    path = folder / f"{stem}{suffix}"
    if make == "loop":
        other = folder / f"{stem}_other{suffix}.lnk"
        os.symlink(other.name, path)
        os.symlink(path.name, other)
    elif make == "self":
        os.symlink(path.name, path)
    elif make == "dangling":
        os.symlink(f"{stem}_gone{suffix}", path)
    elif make == "dir":
        path.mkdir()
    else:
        path.write_bytes(make(rng))
    return path


# ---- tables ----------------------------------------------------------------------------------------
def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv_text(rows: list[dict]) -> str:
    import csv

    buf = io.StringIO()
    header = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.write_text(_csv_text(rows), encoding="utf-8")
    return path


WRONG_VALUES: dict[str, Any] = {"int": 7, "float": 2.5, "bool": True, "list": ["x", "y"], "dict": {"x": 1},
                                "null": None, "empty": ""}


@dataclass
class Schema:
    """A reader's rows: `row(i, image)` makes good row `i`; `kinds` says what each field holds
    (`text`, `path`, `label`, `id`, `split`, `group`, `turns`); `run(path, policy)` reads a file."""

    reader: str
    row: Callable[[int, Optional[str]], dict]
    kinds: dict[str, str]
    run: Callable[[Path, str], tuple[int, dict[str, str]]]
    images: bool = False
    csv_ok: bool = True  # the reader takes CSV
    rows: int = 6

    @property
    def text_field(self) -> str:
        """The field that gets odd text (a text field, else the label)."""
        return next((k for k, kind in self.kinds.items() if kind == "text"), None) or next(
            k for k, kind in self.kinds.items() if kind == "label")


def read_as(kind: str, wrong: str) -> bool:
    """Whether a value of type `wrong` in a field of `kind` may be read as a value (not an error)."""
    return {"text": wrong in ("int", "float"), "optional_text": wrong in ("int", "float", "null", "empty"), "label": wrong in ("int", "float", "bool", "list"),
            "id": wrong in ("int", "float", "null", "empty"), "group": wrong in ("int", "float", "bool", "null", "empty"),
            "split": wrong in ("null", "empty")}.get(kind, False)


def table_cases(schema: Schema, rng: random.Random) -> list[Case]:
    """Broken manifests and data files for one reader: encodings, quoting, JSON, types, sizes."""
    cases: list[Case] = []
    n = schema.rows

    def rows_with_images(folder: Path, r: random.Random) -> list[dict]:
        out = []
        for i in range(n):
            image = place_image(folder / "img", f"im{i}", "good", r).relative_to(folder).as_posix() if schema.images else None
            out.append(schema.row(i, image))
        return out

    def case(name: str, build: Callable[[Path, random.Random, list[dict]], tuple[Path, int, frozenset, tuple]]):
        seed = rng.randrange(1 << 30)

        def make(folder: Path) -> Trial:
            r = random.Random(seed)
            path, rows_in, allowed, keys = build(folder, r, rows_with_images(folder, r))
            policy = r.choice(("skip", "error"))
            return Trial(lambda: schema.run(path, policy), rows_in, (path.name,), allowed, keys)

        cases.append(Case(schema.reader, name, make))

    def line_key(k: int, suffix: str) -> tuple:
        return (f"line {k + 1}",) if suffix == ".jsonl" else (f"row {k + 2}",)

    suffixes = (".jsonl", ".csv") if schema.csv_ok else (".jsonl",)
    for suffix in suffixes:
        writer = write_jsonl if suffix == ".jsonl" else write_csv
        case(f"valid {suffix}", lambda f, r, rows, s=suffix, w=writer: (w(f / f"data{s}", rows), n, frozenset({READ}), ()))
        case(f"zero-byte {suffix}", lambda f, r, rows, s=suffix: ((f / f"data{s}").open("w").close() or f / f"data{s}", 0,
                                                                   frozenset({NAMED}), ()))
        for enc, bom in (("utf-8-sig", "UTF-8 BOM"), ("utf-16", "UTF-16 with BOM"), ("utf-16-be", "UTF-16 BE without BOM"),
                         ("utf-32", "UTF-32 with BOM")):
            def enc_build(f, r, rows, s=suffix, e=enc):
                text = _csv_text(rows) if s == ".csv" else "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows)
                (f / f"data{s}").write_bytes(text.encode(e))
                return f / f"data{s}", n, frozenset({READ, NAMED}), ()
            case(f"{bom} {suffix}", enc_build)

        def latin1(f, r, rows, s=suffix):
            k = r.randrange(n)
            field_name = schema.text_field
            rows[k][field_name] = "caf\u00e9 na\u00efve " + str(rows[k][field_name])
            text = _csv_text(rows) if s == ".csv" else "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows)
            (f / f"data{s}").write_bytes(text.encode("latin-1"))
            return f / f"data{s}", n, frozenset({NAMED}), ()
        case(f"latin-1 bytes in a UTF-8 {suffix}", latin1)

        def huge(f, r, rows, s=suffix, w=writer):
            k = r.randrange(n)
            field_name = schema.text_field
            rows[k][field_name] = " ".join(r.choice(("alpha", "beta", "gamma")) for _ in range(200_000))  # ~1.2 MB
            return w(f / f"data{s}", rows), n, frozenset({READ, SKIP, NAMED}), ()
        case(f"1 MB text in one row of a {suffix}", huge)

        def dup(f, r, rows, s=suffix, w=writer):
            return w(f / f"data{s}", rows + [dict(x) for x in rows]), 2 * n, frozenset({READ, SKIP, NAMED}), ()
        case(f"every row twice (duplicated ids) in a {suffix}", dup)

        def missing_field(f, r, rows, s=suffix, w=writer):
            k = r.randrange(n)
            required = [key for key, kind in schema.kinds.items() if kind in ("text", "path", "turns")]
            gone = r.choice(required)
            rows[k].pop(gone)
            return w(f / f"data{s}", rows), n, ERROR_OR_SKIP, line_key(k, s) if s == ".jsonl" else ()
        case(f"a row without a required field in a {suffix}", missing_field)

    # JSONL damage
    def bad_json_line(kind: str):
        def build(f, r, rows):
            k = r.randrange(n)
            lines = [json.dumps(x) for x in rows]
            lines[k] = {"truncated": lines[k][: len(lines[k]) // 2], "garbage": lines[k] + " }{",
                        "list": json.dumps([1, 2]), "number": "42", "string": json.dumps("a row"),
                        "nan": lines[k].replace("}", ', "extra": NaN}'), "null": "null"}[kind]
            (f / "data.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            allowed = frozenset({READ, NAMED}) if kind == "nan" else frozenset({NAMED})
            return f / "data.jsonl", n, allowed, () if kind == "nan" else (f"line {k + 1}",)
        return build
    for kind in ("truncated", "garbage", "list", "number", "string", "nan", "null"):
        case(f"a JSONL line that is {kind}", bad_json_line(kind))

    def cut_file(f, r, rows):
        text = "".join(json.dumps(x) + "\n" for x in rows)
        (f / "data.jsonl").write_text(text[: len(text) - r.randrange(3, 20)], encoding="utf-8")
        return f / "data.jsonl", n, frozenset({NAMED}), (f"line {n}",)
    case("a JSONL file cut off inside its last row", cut_file)

    # CSV quoting
    if schema.csv_ok:
        def quoting(kind: str):
            def build(f, r, rows):
                k = r.randrange(n)
                lines = _csv_text(rows).splitlines()
                cells = lines[k + 1].split(",")
                cells[-1] = {"unclosed": '"' + cells[-1], "stray": '"' + cells[-1] + '"x',
                             "extra": cells[-1] + ",surplus,cells", "short": ""}[kind]
                if kind == "short":
                    cells = cells[:1]
                lines[k + 1] = ",".join(cells)
                (f / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
                return f / "data.csv", n, frozenset({NAMED, SKIP}), (f"row {k + 2}",)
            return build
        # a one-column row without its cell is a blank line, which is no row in CSV
        for kind in ("unclosed", "stray", "extra") + (("short",) if len(schema.kinds) > 1 else ()):
            case(f"a CSV row with {kind} quoting/cells", quoting(kind))

        def nul(f, r, rows):
            k = r.randrange(n)
            text = _csv_text(rows).splitlines()
            text[k + 1] = text[k + 1].replace(",", ",\0", 1)
            (f / "data.csv").write_text("\n".join(text) + "\n", encoding="utf-8")
            return f / "data.csv", n, frozenset({READ, NAMED, SKIP}), ()
        case("a NUL byte in a CSV row", nul)

        def header_only(f, r, rows):
            (f / "data.csv").write_text(_csv_text(rows).splitlines()[0] + "\n", encoding="utf-8")
            return f / "data.csv", 0, frozenset({NAMED}), ()
        case("a CSV with only its header", header_only)

    # wrong types in every field (JSONL keeps the types)
    for key, kind in schema.kinds.items():
        for wrong in rng.sample(sorted(WRONG_VALUES), 3):
            def build(f, r, rows, key=key, kind=kind, wrong=wrong):
                k = r.randrange(n)
                rows[k][key] = WRONG_VALUES[wrong]
                allowed = ERROR_OR_SKIP | ({READ} if read_as(kind, wrong) else set())
                keys = () if read_as(kind, wrong) else (f"line {k + 1}",) + ((repr(key),) if wrong in ("list", "dict") else ())
                return write_jsonl(f / "data.jsonl", rows), n, allowed, keys
            case(f"{key!r} holds a {wrong}", build)

    # the file itself
    def symlink_loop(f, r, rows):
        os.symlink("b.jsonl", f / "a.jsonl")
        os.symlink("a.jsonl", f / "b.jsonl")
        return f / "a.jsonl", 0, frozenset({NAMED}), ()
    case("the data file is a symlink loop", symlink_loop)

    def a_folder(f, r, rows):
        (f / "data.jsonl").mkdir()
        return f / "data.jsonl", 0, frozenset({NAMED}), ()
    case("the data file is a folder", a_folder)

    def not_there(f, r, rows):
        return f / "nothing.jsonl", 0, frozenset({NAMED}), ()
    case("the data file does not exist", not_there)
    return cases


def image_cases(reader: str, build_trial: Callable[[Path, str, random.Random, str], Trial], rng: random.Random,
                kinds: Optional[list[str]] = None, prefix: str = "", missing_is_error: bool = False) -> list[Case]:
    """One case per image kind for an image reader: good-but-odd images must be read, bad ones must
    be a named error (policy error) or a counted skip (policy skip). With `missing_is_error` (image
    classification manifests: a row naming no file is always an error) an entry that is no file
    (a broken or looping link, a folder) is a named error under either policy."""
    cases = []
    for kind in kinds or [*GOOD_IMAGES, *BAD_IMAGES]:
        seed = rng.randrange(1 << 30)
        policy = rng.choice(("skip", "error"))

        def make(folder: Path, kind=kind, seed=seed, policy=policy) -> Trial:
            trial = build_trial(folder, kind, random.Random(seed), policy)
            if kind in GOOD_IMAGES:
                trial.allowed = frozenset({READ})
            elif missing_is_error and BAD_IMAGES[kind][1] in ("loop", "self", "dangling", "dir"):
                trial.allowed = frozenset({NAMED})
            else:
                trial.allowed = frozenset({SKIP if policy == "skip" else NAMED})
            return trial

        cases.append(Case(reader, f"{prefix}{kind} (policy {policy})", make))
    return cases


def tally(outcomes: list[tuple[Case, Outcome]]) -> dict[str, Counter]:
    per: dict[str, Counter] = {}
    for case, outcome in outcomes:
        per.setdefault(case.reader, Counter())[outcome.kind] += 1
    return per


def table(outcomes: list[tuple[Case, Outcome]]) -> str:
    """The counts per reader as a Markdown table."""
    per = tally(outcomes)
    lines = ["| reader | cases | named errors | counted skips | read correctly | defects |", "|---|---:|---:|---:|---:|---:|"]
    total = Counter()
    for reader, counts in per.items():
        total.update(counts)
        lines.append(f"| {reader} | {sum(counts.values())} | {counts[NAMED]} | {counts[SKIP]} | {counts[READ]} | "
                     f"{counts[DEFECT]} |")
    lines.append(f"| **all** | {sum(total.values())} | {total[NAMED]} | {total[SKIP]} | {total[READ]} | {total[DEFECT]} |")
    return "\n".join(lines)
