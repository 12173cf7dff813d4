"""Vision-language samples: captions and reports, VQA items and multi-turn chats with images, all read
into one standard sample, a `VisualConversation`.

Sources are JSON/JSONL/CSV/Parquet files (read by `datasets`) or a DatasetDict written by the pair
aligner (`mmtune data align`). Chat rows follow the LLaVA/ShareGPT form: `conversations` (or
`messages`) whose texts hold image placeholders (`<image>`), and `image`/`images` naming the files in
placeholder order. Messages come out in the structured form processors' chat templates expect:
`{"role", "content": [{"type": "image"}, {"type": "text", "text": ...}]}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from mmtune.data.readers import read_saved_dataset
from mmtune.data.splits import split_name
from mmtune.data.text_reading import ROLE_ALIASES, _load_rows, raw_turns
from mmtune.errors import ConfigError, DataError

VisualFormat = Literal["auto", "caption", "vqa", "chat"]


@dataclass
class VisualFields:
    """Field names in the source rows, where they differ from the defaults.

    Args:
        id: sample id (default: the row's position, e.g. `train.jsonl line 3`).
        image: one image path or a list of them (`images` is also tried); relative paths are taken
            from `image_root`, else from the data file's folder.
        text: the caption or report (caption format).
        prompt: a per-row instruction (caption format; default: the data module's `prompt`).
        question: the question (VQA format).
        answer: the answer, or a list of accepted answers, the first being the training target (VQA).
        answer_type: e.g. `closed`/`open`; VQA accuracy is also reported per type.
        messages: the turns (chat format; `conversations` is also tried).
        role: the role key of a turn (`from` is also tried).
        content: the text key of a turn (`value` is also tried).
        group: group key (patient, study) that never crosses train/val/test.
        split: a train/val/test column given by the source.
    """

    id: str = "id"
    image: str = "image"
    text: str = "text"
    prompt: str = "prompt"
    question: str = "question"
    answer: str = "answer"
    answer_type: str = "answer_type"
    messages: str = "messages"
    role: str = "role"
    content: str = "content"
    group: str = "group"
    split: str = "split"


@dataclass
class VisualConversation:
    """One training or evaluation sample.

    Attributes:
        id: the sample id (named in every error about it).
        messages: turns with structured content (image and text parts), ending with an assistant turn.
        images: image paths, in the order of the image parts.
        answers: accepted answers of the last assistant turn (the first is the reference).
        answer_type: closed/open (VQA), if given.
        group: group key for splitting.
        split: split named by the source.
        format: the format the row was read in (`caption`, `vqa`, `chat`): VQA accuracy is scored
            for `vqa` samples.
        meta: the row's other columns (site, modality, age band, ...), for subgroup audits.
    """

    id: str
    messages: list[dict]
    images: list[str]
    answers: list[str] = field(default_factory=list)
    answer_type: Optional[str] = None
    group: Optional[str] = None
    split: Optional[str] = None
    format: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        return self.answers[0] if self.answers else self.messages[-1]["content"][-1]["text"]


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


IMAGE_PART = {"type": "image"}


def split_placeholders(text: str, placeholder: str) -> list[dict]:
    """`"<image>\\nWhat is it?"` -> `[{"type": "image"}, {"type": "text", "text": "\\nWhat is it?"}]`."""
    parts: list[dict] = []
    for k, chunk in enumerate(text.split(placeholder)):
        if k:
            parts.append(dict(IMAGE_PART))
        if chunk.strip():  # chat templates add their own separators around images
            parts.append(text_part(chunk.strip()))
    return parts


def _str(row: dict, key: str, sid: str, what: str, required: bool = True) -> Optional[str]:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            present = sorted(k for k, v in row.items() if v not in (None, ""))
            raise DataError(f"sample {sid}: {what} field {key!r} is missing or empty (fields: {present})")
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):  # a number reads as text; true does not
        raise DataError(f"sample {sid}: field {key!r} must be text, got {type(value).__name__}")
    return str(value)


def _images(row: dict, fields: VisualFields, root: Path, sid: str) -> list[str]:
    value = row.get(fields.image)
    if value is None and fields.image == "image":
        value = row.get("images")
    if value is None or value == "":
        return []
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"sample {sid}: image entries must be paths, got {v!r}")
        p = Path(v).expanduser()
        out.append(str(p if p.is_absolute() else root / p))
    return out


def _role(raw: Any, sid: str) -> str:
    role = ROLE_ALIASES.get(str(raw).lower(), str(raw).lower())
    if role not in ("system", "user", "assistant"):
        raise DataError(f"sample {sid}: unknown role {raw!r} (use system, user, assistant or ShareGPT human/gpt)")
    return role


def detect_format(columns: set[str], fields: VisualFields) -> str:
    if fields.messages in columns or "conversations" in columns:
        return "chat"
    if fields.question in columns:
        return "vqa"
    if fields.text in columns:
        return "caption"
    raise DataError(f"cannot tell the format from the fields {sorted(columns)}: expected {fields.messages!r} (chat), "
                    f"{fields.question!r}+{fields.answer!r} (vqa) or {fields.text!r} (caption); set data.format/fields")


def row_to_sample(row: dict, fmt: str, fields: VisualFields, root: Path, origin: str, prompt: str,
                  placeholder: str) -> VisualConversation:
    """One source row as a `VisualConversation`; bad rows raise a DataError naming the sample."""
    sid = str(row.get(fields.id)) if row.get(fields.id) not in (None, "") else origin
    images = _images(row, fields, root, sid)
    answers: list[str] = []
    answer_type = None
    if fmt == "caption":
        instruction = _str(row, fields.prompt, sid, "prompt", required=False) or prompt
        target = _str(row, fields.text, sid, "text")
        messages = [{"role": "user", "content": [dict(IMAGE_PART) for _ in images] + ([text_part(instruction)] if instruction else [])},
                    {"role": "assistant", "content": [text_part(target.strip())]}]
        answers = [target.strip()]
    elif fmt == "vqa":
        question = _str(row, fields.question, sid, "question")
        raw = row.get(fields.answer)
        accepted = [str(a).strip() for a in (raw if isinstance(raw, (list, tuple)) else [raw]) if a not in (None, "")]
        accepted = [a for a in accepted if a]
        if not accepted:
            raise DataError(f"sample {sid}: answer field {fields.answer!r} is missing or empty")
        user = split_placeholders(question, placeholder)
        if not any(p["type"] == "image" for p in user):
            user = [dict(IMAGE_PART) for _ in images] + user
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [text_part(accepted[0])]}]
        answers = accepted
        answer_type = _str(row, fields.answer_type, sid, "answer type", required=False)
    elif fmt == "chat":
        messages = _chat_messages(row, fields, sid, placeholder)
        if not any(p["type"] == "image" for m in messages for p in m["content"]) and images:
            # LLaVA convention: images without placeholders go before the first user text
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                raise DataError(f"sample {sid}: images but no user turn to attach them to")
            first_user["content"] = [dict(IMAGE_PART) for _ in images] + first_user["content"]
        answers = [messages[-1]["content"][-1]["text"]] if messages[-1]["role"] == "assistant" else []
    else:
        raise ConfigError(f"unknown vision-language format {fmt!r} (auto, caption, vqa, chat)")
    placeholders = sum(p["type"] == "image" for m in messages for p in m["content"])
    if placeholders != len(images):
        raise DataError(f"sample {sid}: {placeholders} image placeholder(s) but {len(images)} image(s) "
                        f"({', '.join(images) or 'none'})")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"sample {sid}: the last turn must be the assistant's (the answer to learn)")
    group = _str(row, fields.group, sid, "group", required=False)
    split = split_name(_str(row, fields.split, sid, "split", required=False), f"sample {sid}")
    used = {fields.id, fields.image, "images", fields.text, fields.prompt, fields.question, fields.answer,
            fields.answer_type, fields.messages, "conversations", fields.group, fields.split}
    meta = {k: v for k, v in row.items() if k not in used and k is not None}
    return VisualConversation(sid, messages, images, answers, answer_type, group, split, fmt, meta)


def _chat_messages(row: dict, fields: VisualFields, sid: str, placeholder: str) -> list[dict]:
    messages = []
    for k, raw_role, content in raw_turns(row, fields.messages, fields.role, fields.content, f"sample {sid}"):
        role = _role(raw_role, sid)
        if isinstance(content, str):
            parts = split_placeholders(content, placeholder)
        elif isinstance(content, list):
            parts = [dict(IMAGE_PART) if p.get("type") == "image" else text_part(str(p.get("text", ""))) for p in content
                     if isinstance(p, dict) and (p.get("type") == "image" or str(p.get("text", "")).strip())]
        else:
            raise DataError(f"sample {sid}: turn {k} content must be text or a list of parts")
        if role == "assistant" and (not parts or any(p["type"] != "text" for p in parts)):
            raise DataError(f"sample {sid}: assistant turn {k} must be non-empty text (no images)")
        if not parts:
            raise DataError(f"sample {sid}: turn {k} ({role}) is empty")
        messages.append({"role": role, "content": parts})
    return messages


def read_visual_source(path: str, fmt: VisualFormat, fields: VisualFields, image_root: Optional[str], prompt: str,
                       placeholder: str, on_error) -> list[VisualConversation]:
    """All rows of a data file (or of every split of an aligner DatasetDict directory) as samples.

    Args:
        on_error: called with (sample id or origin, DataError) for a bad row; it re-raises or records a skip.
    """
    source = Path(path).expanduser()
    if source.is_dir() or source.suffix.lower() == ".arrow":
        rows, origins, split_of = read_saved_dataset(source)
    else:
        rows, origins = _load_rows(source)
        split_of = [None] * len(rows)
    root = Path(image_root).expanduser() if image_root else (source if source.is_dir() else source.parent)
    columns = {k for row in rows for k, v in row.items() if v is not None}
    kind = detect_format(columns, fields) if fmt == "auto" else fmt
    out = []
    for row, origin, split in zip(rows, origins, split_of):
        try:
            sample = row_to_sample(row, kind, fields, root, origin, prompt, placeholder)
        except DataError as err:
            message = str(err) if origin in str(err) else f"{origin}: {err}"  # the sample id, and where it is
            on_error(str(row.get(fields.id)) if row.get(fields.id) not in (None, "") else origin, DataError(message))
            continue
        sample.split = sample.split or split
        out.append(sample)
    return out
