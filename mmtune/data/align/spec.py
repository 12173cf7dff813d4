"""What the aligner is asked to do, as typed dataclasses: the CLI maps YAML and flags onto them
(jsonargparse), the Python API builds them directly, and no component below ever sees the YAML."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from mmtune.errors import ConfigError

Policy = Literal["drop", "error"]
PROBLEMS = ("missing_image", "unreadable_image", "duplicate_image", "empty_text", "too_long")
PII_KINDS = ("email", "phone", "date", "id")
RESERVED_COLUMNS = ("id", "key", "image", "text", "group")


@dataclass
class ProblemPolicy:
    """What happens to a pair with each kind of problem.

    `drop` removes it and records the reason in the report; `error` stops the run with a message that
    names the file or row. A problem left at None follows `default`.

    Args:
        default: policy of every problem not set below.
        missing_image: a manifest names an image file that does not exist.
        unreadable_image: the file does not decode as an image (corrupt, truncated, not an image).
        duplicate_image: the file has the same bytes as an earlier image (the first copy is kept).
        empty_text: the text is empty or only whitespace.
        too_long: the text is over `max_chars` characters or `max_words` words (after PII scrubbing).
    """

    default: Policy = "drop"
    missing_image: Optional[Policy] = None
    unreadable_image: Optional[Policy] = None
    duplicate_image: Optional[Policy] = None
    empty_text: Optional[Policy] = None
    too_long: Optional[Policy] = None

    def of(self, problem: str) -> Policy:
        """The policy of `problem` (one of PROBLEMS)."""
        return getattr(self, problem) or self.default


@dataclass
class PIISpec:
    """Scrubbing of personal data from texts (off by default).

    Args:
        enabled: scrub texts before the length check and before they are written.
        kinds: built-in detectors to use: `email`, `phone`, `date` and `id` (labelled record numbers
            such as `MRN: 1234567`, SSN-like numbers and runs of 7 or more digits).
        patterns: your own detectors, name -> regex; matches become `[NAME]` (upper-cased name) and
            are counted under the name. They run before the built-in ones.
    """

    enabled: bool = False
    kinds: list[Literal["email", "phone", "date", "id"]] = field(default_factory=lambda: list(PII_KINDS))
    patterns: dict[str, str] = field(default_factory=dict)


@dataclass
class AlignSpec:
    """Joins image files with texts by a key, checks every pair, splits by group.

    Args:
        images: a folder (searched recursively for image files) or a manifest (`.csv`, `.tsv`,
            `.jsonl`, `.json`) with one image path per row, relative to the manifest.
        texts: a table (`.csv`, `.tsv`, `.jsonl`, `.json`) with one text per row, or a folder
            (searched recursively) of `.txt` files, one text each.
        key: how images and texts are joined. `stem`: the image file name without its suffix equals
            the text's `key_column` value (a file name or path there counts by its stem; a `.txt`
            file's own stem when `texts` is a folder). `column`: the manifest's `image_key_column`
            equals the text's `key_column`. `regex`: `image_regex` (one capture group) applied to the
            image file name equals the text key (the `key_column` value, or a `.txt` file's stem),
            itself passed through `text_regex` when that is set.
        image_column: manifest column with the image path.
        text_column: text table column with the text.
        key_column: text table column with the key (ignored for a `.txt` folder: its file names are
            the keys).
        image_key_column: manifest column with the key for `key: column` (default: `key_column`).
        image_regex: regex with one capture group, for `key: regex`, searched in each image name.
        text_regex: regex with one capture group searched in each text key (None: the key as it is).
        regex_on: what a regex sees of a file: its `stem`, or its `path` relative to the folder (as
            written in a manifest).
        text_lists: a text cell holding a list (a captions file with several captions per image):
            `error` refuses it with a how-to; `explode` makes one pair per item, its position kept in
            a `text_index` column (the group stays the join key, so an image's captions share a split).
        mode: `pairs` gives one row per (image, text) pair; `list` gives one row per text with all
            its images as a list (several views of one study become one multi-image sample).
        keep_columns: text table columns copied to the output (default: all of them except the text
            column and the output's own names id, key, image, text, group).
        group_column: text table column with the group (patient, study) that must stay in one split;
            default: the join key, so all images of one key stay together.
        split_column: text table column with train/val/test given by the source; every kept row must
            have one. Unset: rows are split by group with `split` and `seed`.
        split: train, val, test shares when the source gives no split.
        seed: split seed; the same inputs always give the same splits.
        check_files: check that files named by an image manifest exist (a folder lists only files
            that exist). Checked by listing each directory once, not one stat per file.
        check_images: decode every paired image (in a thread pool) to find unreadable ones.
        check_duplicates: hash every paired image (blake2b of the bytes, in a thread pool); files
            with the same bytes as an earlier one are duplicates.
        max_chars: longest allowed text in characters (None: no limit).
        max_words: longest allowed text in whitespace-separated words (None: no limit).
        policy: drop or error, per problem.
        pii: personal-data scrubbing of texts.
        workers: threads for decoding and hashing images.
        examples: how many examples of each unmatched or dropped kind the report lists.
    """

    images: str
    texts: str
    key: Literal["stem", "column", "regex"] = "stem"
    image_column: str = "path"
    text_column: str = "text"
    key_column: str = "id"
    image_key_column: Optional[str] = None
    image_regex: Optional[str] = None
    text_regex: Optional[str] = None
    regex_on: Literal["stem", "path"] = "stem"
    mode: Literal["pairs", "list"] = "pairs"
    text_lists: Literal["error", "explode"] = "error"
    keep_columns: Optional[list[str]] = None
    group_column: Optional[str] = None
    split_column: Optional[str] = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 42
    check_files: bool = True
    check_images: bool = True
    check_duplicates: bool = True
    max_chars: Optional[int] = None
    max_words: Optional[int] = None
    policy: ProblemPolicy = field(default_factory=ProblemPolicy)
    pii: PIISpec = field(default_factory=PIISpec)
    workers: int = 4
    examples: int = 20

    def validate(self) -> None:
        """Raises ConfigError naming the first option that cannot work."""
        if self.key == "regex":
            if not self.image_regex:
                raise ConfigError("key: regex needs image_regex (a regex with one capture group)")
            compile_key_regex(self.image_regex, "image_regex")
            if self.text_regex:
                compile_key_regex(self.text_regex, "text_regex")
        elif self.image_regex or self.text_regex:
            raise ConfigError(f"image_regex/text_regex are only used with key: regex (key is {self.key!r})")
        for name in ("max_chars", "max_words"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1 (or null for no limit), got {value}")
        if len(self.split) != 3 or min(self.split) < 0 or sum(self.split) <= 0:
            raise ConfigError(f"split must be three non-negative shares (train, val, test), got {list(self.split)}")
        if self.workers < 1 or self.examples < 0:
            raise ConfigError(f"workers must be >= 1 and examples >= 0 (got {self.workers}, {self.examples})")
        for column in self.keep_columns or ():
            if column in RESERVED_COLUMNS:
                raise ConfigError(f"keep_columns: {column!r} is an output column of its own; rename it in the source")
        for kind in self.pii.kinds:
            if kind not in PII_KINDS:
                raise ConfigError(f"pii.kinds: unknown kind {kind!r} (known: {', '.join(PII_KINDS)})")
        for name, pattern in self.pii.patterns.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
                raise ConfigError(f"pii.patterns: name {name!r} must be a word (it becomes the token [{name.upper()}])")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"pii.patterns.{name}: invalid regex {pattern!r} ({err})") from None


def compile_key_regex(pattern: str, option: str) -> re.Pattern:
    """Compiles a key regex, which must have exactly one capture group (the key)."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{option}: invalid regex {pattern!r} ({err})") from None
    if compiled.groups != 1:
        raise ConfigError(f"{option}: {pattern!r} must have exactly one capture group (the key), it has {compiled.groups}")
    return compiled
