"""Tokenizing text samples: token ids with loss masks.

Conversations are rendered with the tokenizer's chat template; the loss mask covers the assistant
replies only (by default), found with the template's `{% generation %}` markers or, for templates
without them, by rendering each conversation prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from mmtune.data.text_reading import Conversation, PlainText
from mmtune.errors import DataError

IGNORE = -100  # label of tokens that carry no loss (torch cross_entropy's ignore_index)


@dataclass
class Tokenized:
    """Token ids and labels (`IGNORE` where no loss) of one sample, with its origin and metadata columns."""

    input_ids: list[int]
    labels: list[int]
    origin: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

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
    return Tokenized(ids, labels, conv.origin, conv.meta)


def tokenize_text(tokenizer, sample: PlainText) -> Tokenized:
    """Plain text plus EOS (documents must end, or packed neighbours run into each other)."""
    ids = tokenizer(sample.text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    return Tokenized(list(ids), list(ids), sample.origin, sample.meta)
