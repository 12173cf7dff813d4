"""Text data for causal-LM fine-tuning: local files -> conversations or plain text -> token ids with
loss masks -> padded or packed batches.

Files are read with `datasets` (JSON, JSONL, CSV, Parquet). Each row becomes a standard sample: a
`Conversation` (alpaca, messages in OpenAI or ShareGPT form, prompt/completion) or a `PlainText`
(continued pretraining). Conversations are rendered with the tokenizer's chat template; the loss mask
covers the assistant replies only (by default), found with the template's `{% generation %}` markers
or, for templates without them, by rendering each conversation prefix.
"""

from __future__ import annotations

import bisect
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mmtune.data.samplers import EpochSampler, ResumableLoader
from mmtune.data.splits import SPLIT_NAMES, assign_splits
from mmtune.errors import ConfigError, DataError

log = logging.getLogger("mmtune")

IGNORE = -100  # label of tokens that carry no loss (torch cross_entropy's ignore_index)
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
    """Turns `{"role", "content"}` in order; `origin` says where it came from (file and line)."""

    messages: list[dict[str, str]]
    origin: str


@dataclass
class PlainText:
    """Text for continued pretraining: every token carries loss."""

    text: str
    origin: str


Sample = Union[Conversation, PlainText]


# ---- reading -----------------------------------------------------------------------------------------
def _load_rows(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of a file through `datasets`, and where each came from (`file line N` / `file row N`)."""
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .json, .jsonl, .csv or .parquet)")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    if path.suffix.lower() == ".jsonl":
        _check_json_lines(path)
    import datasets

    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as err:  # noqa: BLE001  (datasets raises many kinds for unreadable files)
        raise DataError(f"{path}: cannot read it as {kind}: {type(err).__name__}: {str(err)[:300]}") from None
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{path} has no rows")
    if path.suffix.lower() == ".jsonl":
        lines = [i for i, line in enumerate(path.open(encoding="utf-8"), start=1) if line.strip()]
        origins = [f"{path} line {n}" for n in lines] if len(lines) == len(rows) else None
    elif path.suffix.lower() == ".csv":
        origins = [f"{path} row {i + 2}" for i in range(len(rows))]  # the header is row 1
    else:
        origins = None
    return rows, origins or [f"{path} item {i + 1}" for i in range(len(rows))]


def _check_json_lines(path: Path) -> None:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {i}: invalid JSON ({err.msg})") from None
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


def row_to_sample(row: dict, fmt: str, fields: TextFields, origin: str) -> Sample:
    """One source row as a standard sample; a row missing its fields is a DataError naming `origin`."""
    if fmt == "text":
        return PlainText(_text(row, fields.text, origin), origin)
    system = _text(row, fields.system, origin, required=False)
    head = [{"role": "system", "content": system}] if system else []
    if fmt == "alpaca":
        instruction = _text(row, fields.instruction, origin)
        extra = _text(row, fields.input, origin, required=False)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        return Conversation(head + [{"role": "user", "content": user},
                                    {"role": "assistant", "content": _text(row, fields.output, origin)}], origin)
    if fmt == "prompt_completion":
        return Conversation(head + [{"role": "user", "content": _text(row, fields.prompt, origin)},
                                    {"role": "assistant", "content": _text(row, fields.completion, origin)}], origin)
    if fmt != "messages":
        raise ConfigError(f"unknown text format {fmt!r}")
    messages = []
    for k, raw_role, content in raw_turns(row, fields.messages, fields.role, fields.content, origin):
        if not isinstance(content, str):
            raise DataError(f"{origin}: turn {k}: {fields.content!r} must be text, got {type(content).__name__}")
        messages.append({"role": _role(raw_role, fields, origin), "content": content})
    return Conversation(messages, origin)


def read_source(source: TextSource) -> list[Sample]:
    """All rows of one source as samples."""
    path = Path(source.path).expanduser()
    rows, origins = _load_rows(path)
    columns = {k for row in rows for k, v in row.items() if v is not None}
    fmt = detect_format(columns, source.fields) if source.format == "auto" else source.format
    return [row_to_sample(row, fmt, source.fields, origin) for row, origin in zip(rows, origins)]


# ---- tokenizing ----------------------------------------------------------------------------------------
@dataclass
class Tokenized:
    """Token ids and labels (`IGNORE` where no loss) of one sample."""

    input_ids: list[int]
    labels: list[int]
    origin: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def _has_generation_markers(template: Optional[str]) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%-", "{%").replace("-%}", "%}")


def _render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def assistant_spans(tokenizer, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies (with the template's
    end-of-turn text), found by rendering each prefix: works with any template that renders a
    conversation's prefix as a prefix of the whole."""
    return rendered_spans(lambda messages, **kw: _render(tokenizer, messages, **kw), conv.messages, conv.origin)


def rendered_spans(render, messages: list[dict], origin: str) -> tuple[str, list[tuple[int, int]]]:
    """`assistant_spans` for any renderer `render(messages, add_generation_prompt=...) -> str` (a
    tokenizer's or a multimodal processor's chat template)."""
    full = render(messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:k], add_generation_prompt=True) if k else ""
        upto = render(messages[:k + 1])
        if not (full.startswith(before) and full.startswith(upto)) or len(upto) < len(before):
            raise DataError(f"{origin}: the chat template does not render conversation prefixes as prefixes of "
                            "the whole, so the assistant tokens cannot be located; use a template with "
                            "{% generation %} markers (data.chat_template) or assistant_only_loss: false")
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize_conversation(tokenizer, conv: Conversation, assistant_only: bool) -> Tokenized:
    """Token ids and labels of a conversation rendered with the tokenizer's chat template.

    Raises:
        DataError: no assistant turn, or a template that drops an assistant's text.
    """
    replies = [m["content"] for m in conv.messages if m["role"] == "assistant"]
    if not replies:
        raise DataError(f"{conv.origin}: the conversation has no assistant turn, so nothing would be learned from it")
    if _has_generation_markers(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(conv.messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        text = tokenizer.decode([t for t, m in zip(ids, mask) if m])
        full = tokenizer.decode(ids)
    else:
        full, spans = assistant_spans(tokenizer, conv)
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # a token overlapping a reply is the reply's (byte-level BPE glues the leading space onto it)
        mask = [int(any(start < b and end > a for a, b in spans)) for start, end in enc["offset_mapping"]]
        text = "".join(full[a:b] for a, b in spans)
    missing = [r for r in replies if r.strip() and r.strip() not in text]
    if missing:
        where = "the tokens it marks as the assistant's" if missing[0].strip() in full else "the rendered text"
        raise DataError(f"{conv.origin}: the chat template drops the assistant's text ({missing[0][:60]!r} is not in "
                        f"{where}); fix the template or choose another with data.chat_template")
    labels = [t if m or not assistant_only else IGNORE for t, m in zip(ids, mask)]
    return Tokenized(ids, labels, conv.origin)


def tokenize_text(tokenizer, sample: PlainText) -> Tokenized:
    """Plain text plus EOS (documents must end, or packed neighbours run into each other)."""
    ids = tokenizer(sample.text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return Tokenized(list(ids), list(ids), sample.origin)


# ---- packing and batching -------------------------------------------------------------------------------
def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins of sample indices, each bin's total length at most `capacity`.

    Deterministic (ties keep input order), so resumed runs pack identically.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (room - n, b))
    return bins


class TokenDataset(Dataset):
    """Items are lists of tokenized samples: one each without packing, several per packed row."""

    def __init__(self, rows: list[list[Tokenized]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> list[Tokenized]:
        return self.rows[key[1] if isinstance(key, tuple) else key]


@dataclass
class Collator:
    """Pads rows on the right. A packed row concatenates its samples with position ids restarting at 0
    for each; it gets no 2D attention mask, so transformers derives a block-diagonal causal mask from
    the position ids (sdpa, eager, flex) or varlen boundaries (flash attention): attention stays inside
    each sample. The first token of each sample carries no label, as it has no predecessor unpacked.
    """

    pad_id: int
    packed: bool = False

    def __call__(self, items: list[list[Tokenized]]) -> dict[str, torch.Tensor]:
        width = max(sum(len(s) for s in row) for row in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(items), width), dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for r, row in enumerate(items):
            at = 0
            for s in row:
                n = len(s)
                ids[r, at:at + n] = torch.tensor(s.input_ids)
                labels[r, at:at + n] = torch.tensor(s.labels)
                labels[r, at] = IGNORE
                positions[r, at:at + n] = torch.arange(n)
                attention[r, at:at + n] = 1
                at += n
            # padding continues as its own "sample" (positions from 0): it never joins a real one
            positions[r, at:] = torch.arange(width - at)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions,
                 "num_tokens": attention.sum(),
                 # where each sample came from (file and line), named by errors about the batch
                 "sample_id": [s.origin for row in items for s in row]}
        if not self.packed:
            batch["attention_mask"] = attention
        return batch


@dataclass
class PromptCollator:
    """Left-padded chat prompts (with the generation prompt) for `generate`."""

    tokenizer: Any

    def __call__(self, items: list[tuple[int, Conversation]]) -> dict:
        texts = [self.tokenizer.apply_chat_template(c.messages, tokenize=False, add_generation_prompt=True) for _, c in items]
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            self.tokenizer.padding_side = side
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "index": torch.tensor([i for i, _ in items])}


class PromptDataset(Dataset):
    def __init__(self, convs: list[Conversation]) -> None:
        self.convs = convs

    def __len__(self) -> int:
        return len(self.convs)

    def __getitem__(self, i: int) -> tuple[int, Conversation]:
        return i, self.convs[i]


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


# ---- the data module --------------------------------------------------------------------------------------
class TextData(L.LightningDataModule):
    """Instruction, chat or plain-text data for `CausalLMTask`.

    The task connects itself in its `setup` (`connect(tokenizer)`), after which samples are tokenized
    with the model's own tokenizer and chat template.

    Args:
        path: one data file (.json, .jsonl, .csv, .parquet); split into train/val/test by `split`
            unless `val_path`/`test_path` are given.
        sources: several training files mixed with weights (instead of, or besides, `path`).
        format: format of `path` (`auto` detects it from the fields).
        fields: field names of `path`, where they differ from the defaults.
        val_path: a separate validation file.
        test_path: a separate test file.
        predict_path: prompts to generate for (`prompt`, `instruction` or `messages` rows).
        split: train/val/test shares of `path` when no separate val/test files are given.
        seed: split, subsampling and shuffle seed.
        shuffle: reshuffle the training rows every epoch; False keeps the file's order (curricula).
        assistant_only_loss: loss on assistant tokens only; False trains on every token.
        max_length: longest sample in tokens (and the row length when packing).
        overlong: a longer sample is `truncate`d or `drop`ped; either way it is counted and reported.
        packing: several samples per training row (attention kept inside each sample).
        batch_size: rows per training batch per device.
        eval_batch_size: rows per evaluation batch (default: `batch_size`).
        num_workers: data loading processes.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        sources: list[TextSource] = [],  # noqa: B006  (jsonargparse needs a plain default)
        format: TextFormat = "auto",
        fields: TextFields = TextFields(),
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        predict_path: Optional[str] = None,
        split: tuple[float, float, float] = (0.9, 0.1, 0.0),
        seed: int = 42,
        shuffle: bool = True,
        assistant_only_loss: bool = True,
        max_length: int = 1024,
        overlong: Literal["truncate", "drop"] = "truncate",
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.val_path, self.test_path, self.predict_path = path, val_path, test_path, predict_path
        self.sources = [s if isinstance(s, TextSource) else TextSource(**s) for s in sources]
        self.format = format
        self.fields = fields if isinstance(fields, TextFields) else TextFields(**fields)
        self.split_ratios = tuple(split)
        self.seed = seed
        self.shuffle = shuffle
        self.assistant_only_loss = assistant_only_loss
        if max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {max_length}")
        self.max_length = max_length
        self.overlong = overlong
        self.packing = packing
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers

        self.samples: dict[str, list[Sample]] = {}
        self.prompts: list[Conversation] = []
        self.tokenized: dict[str, list[Tokenized]] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self.tokenizer = None

    # ---- reading ---------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in ("fit", "validate", "test", None) and not self.samples:
            self._read_labeled()
        if stage == "predict" and not self.prompts:
            if not self.predict_path:
                raise DataError("data.predict_path is not set: name a JSONL file of prompts")
            self.prompts = read_prompts(self.predict_path)

    def _read_labeled(self) -> None:
        if not self.path and not self.sources:
            raise DataError("data.path (or data.sources) is not set: name a .jsonl/.json/.csv/.parquet file")
        splits: dict[str, list[Sample]] = {name: [] for name in SPLIT_NAMES}
        if self.path:
            main = self._read(TextSource(self.path, self.format, 1.0, self.fields))
            ratios = [0.0 if (name == "val" and self.val_path) or (name == "test" and self.test_path) else r
                      for name, r in zip(SPLIT_NAMES, self.split_ratios)]
            for sample, name in zip(main, assign_splits(len(main), ratios, self.seed)):
                splits[name].append(sample)
        rng = random.Random(self.seed)
        for source in self.sources:
            if source.weight < 0:
                raise ConfigError(f"data.sources: weight of {source.path} is negative")
            rows = self._read(source)
            whole, part = divmod(source.weight, 1.0)
            splits["train"] += rows * int(whole) + rng.sample(rows, round(part * len(rows)))
        if self.val_path:
            splits["val"] = self._read(TextSource(self.val_path, self.format, 1.0, self.fields))
        if self.test_path:
            splits["test"] = self._read(TextSource(self.test_path, self.format, 1.0, self.fields))
        if not splits["train"]:
            raise DataError(f"the train split is empty (sources: {self.path or [s.path for s in self.sources]})")
        self.samples = splits

    def _read(self, source: TextSource) -> list:
        return read_source(source)

    # ---- connection to the task -----------------------------------------------------------------------
    def connect(self, tokenizer) -> None:
        """Tokenizes every split with the model's tokenizer; counts truncated and dropped samples."""
        if self.tokenizer is tokenizer and self.tokenized:
            return
        self.tokenizer = tokenizer
        self.tokenized, self.stats = {}, {}
        for name, samples in self.samples.items():
            self.tokenized[name], self.stats[name] = self._tokenize(samples)
        for name, st in self.stats.items():
            if st["truncated"] or st["dropped"] or st["no_target"]:
                log.warning("[mmtune] %s split: %d of %d samples longer than max_length=%d were %s; %d kept no "
                            "target token and were dropped", name, st["truncated"] + st["dropped"], st["samples"],
                            self.max_length, "truncated" if self.overlong == "truncate" else "dropped", st["no_target"])
        self._write_stats()

    def _tokenize(self, samples: list[Sample]) -> tuple[list[Tokenized], dict[str, int]]:
        out: list[Tokenized] = []
        st = {"samples": len(samples), "truncated": 0, "dropped": 0, "no_target": 0, "tokens": 0}
        for sample in samples:
            if isinstance(sample, PlainText):
                item = tokenize_text(self.tokenizer, sample)
            else:
                item = tokenize_conversation(self.tokenizer, sample, self.assistant_only_loss)
            if len(item) > self.max_length:
                if self.overlong == "drop":
                    st["dropped"] += 1
                    continue
                st["truncated"] += 1
                item = Tokenized(item.input_ids[:self.max_length], item.labels[:self.max_length], item.origin)
            if all(label == IGNORE for label in item.labels[1:]):
                st["no_target"] += 1  # e.g. the reply was cut off entirely: nothing to learn, and a NaN loss
                continue
            st["tokens"] += len(item)
            out.append(item)
        return out, st

    def _write_stats(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not log_dir:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / "data_stats.json").write_text(json.dumps(
            {"max_length": self.max_length, "overlong": self.overlong, "packing": self.packing, "splits": self.stats},
            indent=2))

    # ---- loaders -----------------------------------------------------------------------------------------
    def _rows(self, split: str, packed: bool) -> TokenDataset:
        if self.tokenizer is None:
            raise RuntimeError("connect() the data module to a task before asking for data (Trainer does this in setup)")
        items = self.tokenized.get(split) or []
        if not items:
            raise DataError(f"the {split} split is empty (source: {self.path or [s.path for s in self.sources]}); "
                            "add data or adjust data.split")
        if packed:
            return TokenDataset([[items[i] for i in b] for b in pack([len(x) for x in items], self.max_length)])
        return TokenDataset([[x] for x in items])

    def _loader(self, dataset: Dataset, batch_size: int, collate, **kwargs) -> DataLoader:
        loader = ResumableLoader if isinstance(kwargs.get("sampler"), EpochSampler) else DataLoader  # training: resumes mid-epoch
        return loader(dataset, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate,
                      persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        dataset = self._rows("train", self.packing)
        sampler = EpochSampler.for_this_process(len(dataset), self.seed, shuffle=self.shuffle)
        return self._loader(dataset, self.batch_size, self._collator(self.packing), sampler=sampler)

    def _collator(self, packed: bool):
        return Collator(self.tokenizer.pad_token_id, packed)

    def val_dataloader(self) -> DataLoader:
        # Unpacked, so validation loss is exact whatever the training layout.
        return self._loader(self._rows("val", False), self.eval_batch_size, self._collator(False))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._rows("test", False), self.eval_batch_size, self._collator(False))

    def predict_dataloader(self) -> DataLoader:
        if self.tokenizer is None:
            raise RuntimeError("connect() the data module to a task before asking for data")
        return self._loader(PromptDataset(self.prompts), self.eval_batch_size, PromptCollator(self.tokenizer))
