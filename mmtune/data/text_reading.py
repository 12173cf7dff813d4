"""Text data sources for causal-LM fine-tuning: local files -> standard samples.

Files are read with `datasets` (JSON, JSONL, CSV, Parquet). Each row becomes a standard sample: a
`Conversation` (alpaca, messages in OpenAI or ShareGPT form, prompt/completion) or a `PlainText`
(continued pretraining), named by its origin (file and line) in every error about it. Prompts for
generation (`predict`, fixed validation prompts) are read here too.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from mmtune.data.readers import _csv_rows, json_lines, read_text
from mmtune.errors import ConfigError, DataError

TextFormat = Literal["auto", "alpaca", "messages", "prompt_completion", "text"]
READERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT and other common role names, mapped onto the OpenAI ones.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
                "function": "tool", "observation": "tool"}


@dataclass
class TextFields:
    """Field names in the source rows, for data whose names differ from the defaults.

    Args:
        messages: the list of turns (messages form). `conversations` is also tried when absent.
        role: the role key of a turn (`from` is also tried: ShareGPT).
        content: the text key of a turn (`value` is also tried: ShareGPT).
        roles: extra source role name -> `system`/`user`/`assistant`/`tool` (ShareGPT's `human`/`gpt` are known).
        instruction: alpaca instruction.
        input: alpaca input (optional in a row).
        output: alpaca output.
        system: a system prompt field (alpaca and prompt/completion; optional in a row).
        prompt: prompt/completion prompt.
        completion: prompt/completion completion.
        text: plain text.
    """

    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    roles: dict[str, str] = field(default_factory=dict)
    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"


@dataclass
class TextSource:
    """One data file and how it enters the training mix.

    Args:
        path: a .json, .jsonl, .csv or .parquet file.
        format: `alpaca`, `messages`, `prompt_completion`, `text`, or `auto` (from the fields present).
        weight: how often each row is used per epoch: 2.0 repeats every row twice, 0.5 uses a seeded
            random half (mixes several sources in chosen proportions).
        fields: field names, when they differ from the defaults.
    """

    path: str
    format: TextFormat = "auto"
    weight: float = 1.0
    fields: TextFields = field(default_factory=TextFields)


@dataclass
class Conversation:
    """Turns `{"role", "content"}` in order; `origin` says where it came from (file and line), `meta`
    holds the row's other columns (category, source, language, ...) for subgroup audits."""

    messages: list[dict[str, str]]
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlainText:
    """Text for continued pretraining: every token carries loss."""

    text: str
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)


Sample = Union[Conversation, PlainText]


# ---- reading -----------------------------------------------------------------------------------------
def _load_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a file through `datasets`, and where each came from (`file line N` / `file row N`)."""
    if path.is_dir() or path.suffix.lower() == ".arrow":  # a `datasets` folder (save_to_disk) or an Arrow file
        from mmtune.data.readers import read_saved_dataset

        rows, origins, _ = read_saved_dataset(path)
        if not rows:
            raise DataError(f"{path} has no rows")
        return rows, origins
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .json, .jsonl, .csv or .parquet)")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    suffix = path.suffix.lower()
    text = None
    if suffix in (".jsonl", ".json", ".csv"):
        with path.open("rb") as f:
            head = f.read(2)
        if head in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):  # also the start of a UTF-32 LE mark
            # `datasets` (Arrow, pandas) reads UTF-8 only
            raise DataError(f"{path}: UTF-16 or UTF-32 text; text, preference and vision-language data files must be "
                            "UTF-8 (save the file as UTF-8)")
        text = read_text(path)  # names the line of a byte that is not UTF-8, or of a NUL
        if suffix == ".jsonl":
            _check_json_lines(path, text)
        elif suffix == ".csv":
            for _ in _csv_rows(path, text):  # strict: names the row of an open quote or a row with surplus cells
                pass
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as err:  # noqa: BLE001  (datasets raises many kinds for unreadable files)
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:  # the parser's own words
            cause = cause.__cause__ or cause.__context__
        detail = " ".join(str(cause).split())[:300]
        raise DataError(f"{path}: cannot read it as {kind}: {type(cause).__name__}: {detail}") from None
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{path} has no rows")
    if path.suffix.lower() == ".jsonl":
        lines = [i for i, line in enumerate(text.split("\n"), start=1) if line.strip()]
        origins = [f"{path} line {n}" for n in lines] if len(lines) == len(rows) else None
    elif path.suffix.lower() == ".csv":
        origins = [f"{path} row {i + 2}" for i in range(len(rows))]  # the header is row 1
    else:
        origins = None
    return rows, origins or [f"{path} item {i + 1}" for i in range(len(rows))]


def _check_json_lines(path: Path, text: str) -> None:
    for i, value in json_lines(path, text):
        if not isinstance(value, dict):
            raise DataError(f"{path} line {i}: expected a JSON object, got {type(value).__name__}")


def detect_format(columns: set[str], fields: TextFields) -> str:
    """The format whose fields the rows have (messages first: such rows may also carry a `text`)."""
    if fields.messages in columns or "conversations" in columns:
        return "messages"
    if fields.instruction in columns and fields.output in columns:
        return "alpaca"
    if fields.prompt in columns and fields.completion in columns:
        return "prompt_completion"
    if fields.text in columns:
        return "text"
    raise DataError(f"cannot tell the format from the fields {sorted(columns)}: expected {fields.messages!r} (messages), "
                    f"{fields.instruction!r}+{fields.output!r} (alpaca), {fields.prompt!r}+{fields.completion!r} "
                    f"(prompt_completion) or {fields.text!r} (text); set format/fields for other names")


def _text(row: dict, key: str, origin: str, required: bool = True) -> Optional[str]:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip() and required):
        if required:
            raise DataError(f"{origin}: missing field {key!r} (fields: {sorted(k for k, v in row.items() if v is not None)})")
        return None
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {key!r} must be text, got {type(value).__name__}")
    return value


def raw_turns(row: dict, messages_key: str, role_key: str, content_key: str, where: str) -> list[tuple[int, Any, Any]]:
    """(index, role, content) of a row's turns, in the OpenAI form (`role`/`content`, or the names
    given) or ShareGPT's (`conversations` of `from`/`value`). Text and vision-language data both read
    turns this way; each then checks the content it accepts.

    Raises:
        DataError: naming `where`, when the turns are missing or a turn lacks its role or content.
    """
    turns = row.get(messages_key)
    if turns is None:
        turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {messages_key!r} (or 'conversations') must be a non-empty list of turns")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {k} is not an object")
        role = turn.get(role_key) if turn.get(role_key) is not None else turn.get("from")
        content = turn.get(content_key) if turn.get(content_key) is not None else turn.get("value")
        if role is None or content is None:
            raise DataError(f"{where}: turn {k} needs {role_key!r} and {content_key!r} (or ShareGPT 'from'/'value'); "
                            f"got keys {sorted(key for key, v in turn.items() if v is not None)}")
        out.append((k, role, content))
    return out


def _role(raw: Any, fields: TextFields, origin: str) -> str:
    name = str(raw)
    role = fields.roles.get(name) or ROLE_ALIASES.get(name.lower()) or name.lower()
    if role not in ROLES:
        raise DataError(f"{origin}: unknown role {raw!r} (known: {list(ROLES)}; map others with fields.roles)")
    return role


def format_columns(fmt: str, fields: TextFields) -> set[str]:
    """The columns a format reads; a row's other columns are its metadata."""
    return {"text": {fields.text},
            "alpaca": {fields.instruction, fields.input, fields.output, fields.system},
            "prompt_completion": {fields.prompt, fields.completion, fields.system},
            "messages": {fields.messages, "conversations", fields.system}}.get(fmt, set())


def row_to_sample(row: dict, fmt: str, fields: TextFields, origin: str) -> Sample:
    """One source row as a standard sample; a row missing its fields is a DataError naming `origin`.
    The columns the format does not read travel as the sample's `meta`."""
    used = format_columns(fmt, fields)
    meta = {k: v for k, v in row.items() if k not in used and k is not None}
    if fmt == "text":
        return PlainText(_text(row, fields.text, origin), origin, meta)
    system = _text(row, fields.system, origin, required=False)
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "alpaca":
        instruction = _text(row, fields.instruction, origin)
        extra = _text(row, fields.input, origin, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Conversation(head + [{"role": "user", "content": user},
                                    {"role": "assistant", "content": _text(row, fields.output, origin)}], origin, meta)
    if fmt == "prompt_completion":
        return Conversation(head + [{"role": "user", "content": _text(row, fields.prompt, origin)},
                                    {"role": "assistant", "content": _text(row, fields.completion, origin)}], origin,
                            meta)
    if fmt != "messages":
        raise ConfigError(f"unknown text format {fmt!r}")
    messages = []
    for k, raw_role, content in raw_turns(row, fields.messages, fields.role, fields.content, origin):
        if not isinstance(content, str):
            raise DataError(f"{origin}: turn {k}: {fields.content!r} must be text, got {type(content).__name__}")
        messages.append({"role": _role(raw_role, fields, origin), "content": content})
    return Conversation(messages, origin, meta)


def read_source(source: TextSource) -> list[Sample]:
    """All rows of one source as samples."""
    path = Path(source.path).expanduser()
    rows, origins = _load_rows(path)
    columns = {k for row in rows for k, v in row.items() if v is not None}
    fmt = detect_format(columns, source.fields) if source.format == "auto" else source.format
    return [row_to_sample(row, fmt, source.fields, origin) for row, origin in zip(rows, origins)]


# ---- prompts for generation ------------------------------------------------------------------------
def prompt_conversation(prompt: Union[str, list, dict], origin: str = "") -> Conversation:
    """A prompt for generation: a string (one user turn), a list of turns, or a row with `prompt`/`messages`."""
    if isinstance(prompt, str):
        return Conversation([{"role": "user", "content": prompt}], origin)
    if isinstance(prompt, dict):
        if isinstance(prompt.get("prompt"), str):
            system = prompt.get("system")
            head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
            return Conversation(head + [{"role": "user", "content": prompt["prompt"]}], origin)
        if isinstance(prompt.get("instruction"), str):
            extra = prompt.get("input")
            user = f"{prompt['instruction']}\n\n{extra}" if extra else prompt["instruction"]
            return Conversation([{"role": "user", "content": user}], origin)
        turns = prompt.get("messages", prompt.get("conversations"))
        if isinstance(turns, list) and turns:
            conv = row_to_sample({"messages": turns}, "messages", TextFields(), origin)
            return conv
        raise DataError(f"{origin}: a prompt row needs 'prompt', 'instruction' or 'messages' (got {sorted(prompt)})")
    if isinstance(prompt, list):
        return row_to_sample({"messages": prompt}, "messages", TextFields(), origin)
    raise DataError(f"{origin}: a prompt must be text, a list of turns, or an object")


def read_prompts(path: str) -> list[Conversation]:
    """Prompts to generate for, from a JSONL/JSON/CSV/Parquet file."""
    rows, origins = _load_rows(Path(path).expanduser())
    return [prompt_conversation({k: v for k, v in row.items() if v is not None}, o) for row, o in zip(rows, origins)]
