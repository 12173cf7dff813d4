"""Turning `VisualConversation`s into model inputs with the model's own processor.

The processor does what is family-specific (image preprocessing, expanding each image placeholder
into the family's image tokens, batching pixel tensors); mmtune adds what no processor does: the
loss mask. It is found on the text *before* image expansion (assistant spans of the rendered chat,
located by rendering conversation prefixes, as for text SFT) and carried over to the expanded ids by
matching the text tokens in order: expansion only inserts image tokens, so every text token has one
counterpart. Labels are therefore masked on the prompt, the image tokens and the padding.

Four encodings cover the families (chosen automatically, or by name):
- `chat`: the processor has a chat template (LLaVA, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL, ...);
- `plain`: no template, a decoder reading `prompt + target` (BLIP);
- `prefix_suffix`: the processor builds prefix-LM inputs from a prompt and a `suffix` (PaliGemma);
- `encoder_decoder`: images into the encoder, the target into the decoder (VisionEncoderDecoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from mmtune.data.text_tokens import IGNORE, rendered_spans
from mmtune.data.vl_samples import VisualConversation
from mmtune.errors import ConfigError, DataError
from mmtune.registry import Registry

ENCODINGS: Registry[type] = Registry("vision-language encoding")
# Families whose processor builds prefix-LM inputs itself from `suffix=` (a lookup by the config's
# model_type, not by a model name).
PREFIX_SUFFIX_TYPES = {"paligemma"}
# Families whose decoder starts every text with a BOS that replaces the tokenizer's first token
# (BLIP's text decoder: `[DEC]` instead of `[CLS]`, as its `generate` does).
DECODER_BOS_TYPES = {"blip"}


@dataclass
class Prepared:
    """What an encoding computes once per sample (at setup) and reuses every epoch."""

    sample: VisualConversation
    text: str  # full training text (chat/plain) or the target (prefix_suffix/encoder_decoder)
    prompt: str  # generation prompt
    ids: Optional[list[int]] = None  # unexpanded token ids of `text` (chat/plain)
    mask: Optional[list[int]] = None  # 1 where the token carries loss


def transfer_labels(u_ids: list[int], u_mask: list[int], e_ids: list[int], sid: str) -> list[int]:
    """Labels over the processor's expanded ids `e_ids`, from the mask over the unexpanded ids.

    Walks both in order: an expanded token equal to the next unexpanded one is its counterpart,
    any other is inserted (image tokens, a BOS the processor adds) and gets no label.
    """
    labels = [IGNORE] * len(e_ids)
    i = 0
    for j, tok in enumerate(e_ids):
        if i < len(u_ids) and tok == u_ids[i]:
            if u_mask[i]:
                labels[j] = tok
            i += 1
    if i < len(u_ids):
        raise DataError(f"sample {sid}: the processor's token ids do not contain the text's tokens in order "
                        f"(matched {i} of {len(u_ids)}); the processor and tokenizer disagree")
    return labels


def _pil_batch(images: list[list]) -> Optional[list[list]]:
    return images if any(images) else None


def _call(processor, padding_side: str, **kwargs) -> dict:
    tok = processor.tokenizer
    side = tok.padding_side
    tok.padding_side = padding_side
    try:
        return dict(processor(padding=True, return_tensors="pt", **kwargs))
    finally:
        tok.padding_side = side


def _truncate(inputs: dict, labels: torch.Tensor, max_length: Optional[int], image_ids: set[int],
              samples: list[VisualConversation]) -> tuple[dict, torch.Tensor, int]:
    """Cuts right-padded rows to `max_length` tokens; a cut through image tokens is an error."""
    ids = inputs["input_ids"]
    if max_length is None or ids.shape[1] <= max_length:
        return inputs, labels, 0
    lengths = inputs["attention_mask"].sum(1) if "attention_mask" in inputs else torch.full((len(ids),), ids.shape[1])
    for r, sample in enumerate(samples):
        tail = ids[r, max_length:int(lengths[r])].tolist()
        if any(t in image_ids for t in tail):
            raise DataError(f"sample {sample.id}: max_length={max_length} would cut through its image tokens "
                            f"({int(lengths[r])} tokens in all); raise data.max_length")
    cut = {k: (v[:, :max_length] if torch.is_tensor(v) and v.dim() >= 2 and v.shape[:2] == ids.shape else v)
           for k, v in inputs.items()}
    return cut, labels[:, :max_length], int((lengths > max_length).sum())


class ChatEncoding:
    """Processors with a chat template: the conversation is rendered by the template."""

    def __init__(self, processor, image_ids: set[int], first_token_id: Optional[int] = None) -> None:
        self.processor, self.image_ids = processor, image_ids
        tok = processor.tokenizer
        probe = [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "y"}]}]
        full, spans = rendered_spans(self._render, probe, "chat template probe")
        # Templates that write the BOS themselves must not get a second one from the tokenizer.
        self.add_special = not (tok.bos_token and full.startswith(tok.bos_token))
        # The special tokens closing an assistant turn (<|im_end|>, <end_of_utterance>, ...) stop
        # generation. A template that closes turns without one (LLaVA-1.5's ends with a space) gets
        # the EOS appended to the last reply, or the model would never learn to stop.
        reply = tok(full[spans[0][0]:spans[0][1]], add_special_tokens=False)["input_ids"]
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        self.stop_ids = [i for i in reply if i in special]
        self.append_eos = not self.stop_ids and tok.eos_token is not None
        if self.append_eos:
            self.stop_ids = [tok.eos_token_id]

    def generate_kwargs(self) -> dict:
        return {"eos_token_id": self.stop_ids or None, "pad_token_id": self.processor.tokenizer.pad_token_id}

    def _render(self, messages: list[dict], **kwargs) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, **kwargs)

    def prepare(self, sample: VisualConversation) -> Prepared:
        full, spans = rendered_spans(self._render, sample.messages, f"sample {sample.id}")
        if self.append_eos:
            end = spans[-1][1]
            full = full[:end] + self.processor.tokenizer.eos_token + full[end:]
            spans[-1] = (spans[-1][0], end + len(self.processor.tokenizer.eos_token))
        prompt = self._render(sample.messages[:-1], add_generation_prompt=True)
        ids, mask = _masked_tokens(self.processor.tokenizer, full, spans, self.add_special)
        _require_target(sample, self.processor.tokenizer)
        return Prepared(sample, full, prompt, ids, mask)

    def train_batch(self, items: list[Prepared], images: list[list], max_length: Optional[int]) -> dict:
        enc = _call(self.processor, "right", text=[p.text for p in items], images=_pil_batch(images),
                    add_special_tokens=self.add_special)
        return _with_labels(enc, items, self.image_ids, max_length)

    def prompt_batch(self, items: list[Prepared], images: list[list]) -> dict:
        return _call(self.processor, "left", text=[p.prompt for p in items], images=_pil_batch(images),
                     add_special_tokens=self.add_special)


class PlainEncoding:
    """No chat template: the decoder reads `prompt target` after the image (BLIP); single turn."""

    def __init__(self, processor, image_ids: set[int], first_token_id: Optional[int] = None) -> None:
        self.processor, self.image_ids, self.first_token_id = processor, image_ids, first_token_id

    def generate_kwargs(self) -> dict:
        return {}  # BLIP's generate sets its own stop (SEP) and padding tokens

    def prepare(self, sample: VisualConversation) -> Prepared:
        if len(sample.messages) != 2 or len(sample.images) != 1:
            raise DataError(f"sample {sample.id}: this model has no chat template, so it takes one image and one "
                            f"question or instruction per sample (got {len(sample.messages)} turns, "
                            f"{len(sample.images)} images); set task.chat_template for chats")
        prompt = " ".join(p["text"] for p in sample.messages[0]["content"] if p["type"] == "text").strip()
        target = sample.messages[1]["content"][0]["text"]
        full = f"{prompt} {target}" if prompt else target
        ids, mask = _masked_tokens(self.processor.tokenizer, full, [(len(full) - len(target), len(full))], True,
                                   label_trailing_special=True)
        _require_target(sample, self.processor.tokenizer)
        return Prepared(sample, full, prompt, ids, mask)

    def train_batch(self, items: list[Prepared], images: list[list], max_length: Optional[int]) -> dict:
        enc = _call(self.processor, "right", text=[p.text for p in items], images=[im[0] for im in images])
        out = _with_labels(enc, items, self.image_ids, max_length)
        if self.first_token_id is not None:
            out["inputs"]["input_ids"][:, 0] = self.first_token_id
        return out

    def prompt_batch(self, items: list[Prepared], images: list[list]) -> dict:
        enc = _call(self.processor, "left", text=[p.prompt for p in items], images=[im[0] for im in images])
        if self.first_token_id is not None:
            enc["input_ids"][:, 0] = self.first_token_id
        return enc


class PrefixSuffixEncoding:
    """Prefix-LM families whose processor builds inputs and labels from a prompt and a `suffix`
    (PaliGemma: the prompt and images attend bidirectionally, the suffix causally); single turn."""

    def __init__(self, processor, image_ids: set[int], first_token_id: Optional[int] = None) -> None:
        self.processor, self.image_ids = processor, image_ids

    def generate_kwargs(self) -> dict:
        return _eos_and_pad(self.processor)

    def prepare(self, sample: VisualConversation) -> Prepared:
        if len(sample.messages) != 2:
            raise DataError(f"sample {sample.id}: this model takes one prompt and one answer (got "
                            f"{len(sample.messages)} turns)")
        prompt = " ".join(p["text"] for p in sample.messages[0]["content"] if p["type"] == "text").strip()
        target = sample.messages[1]["content"][0]["text"]
        _require_target(sample, self.processor.tokenizer)
        image_token = getattr(self.processor, "image_token", "<image>")
        return Prepared(sample, target, image_token * len(sample.images) + prompt)

    def train_batch(self, items: list[Prepared], images: list[list], max_length: Optional[int]) -> dict:
        enc = _call(self.processor, "right", text=[p.prompt for p in items], images=_pil_batch(images),
                    suffix=[p.text for p in items])
        labels = enc.pop("labels")
        inputs, labels, truncated = _truncate(enc, labels, max_length, self.image_ids, [p.sample for p in items])
        return {"inputs": inputs, "labels": labels, "truncated": truncated}

    def prompt_batch(self, items: list[Prepared], images: list[list]) -> dict:
        return _call(self.processor, "left", text=[p.prompt for p in items], images=_pil_batch(images))


class EncoderDecoderEncoding:
    """Image encoder + text decoder (VisionEncoderDecoder): the images go to the encoder and the
    target (ending with EOS) is the decoder's labels; the prompt is not used. One image per sample."""

    def __init__(self, processor, image_ids: set[int], first_token_id: Optional[int] = None) -> None:
        self.processor = processor

    def generate_kwargs(self) -> dict:
        return _eos_and_pad(self.processor)

    def prepare(self, sample: VisualConversation) -> Prepared:
        if len(sample.messages) != 2 or len(sample.images) != 1:
            raise DataError(f"sample {sample.id}: an encoder-decoder captioner takes one image and one target "
                            f"(got {len(sample.messages)} turns, {len(sample.images)} images)")
        target = sample.messages[1]["content"][0]["text"]
        tok = self.processor.tokenizer
        ids = tok(target, add_special_tokens=False)["input_ids"]
        _require_target(sample, self.processor.tokenizer)
        if tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        return Prepared(sample, target, "", ids, [1] * len(ids))

    def train_batch(self, items: list[Prepared], images: list[list], max_length: Optional[int]) -> dict:
        pixels = self.processor.image_processor(images=[im[0] for im in images], return_tensors="pt")["pixel_values"]
        width = max(len(p.ids) for p in items)
        truncated = sum(len(p.ids) > max_length for p in items) if max_length else 0
        width = min(width, max_length) if max_length else width
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        for r, p in enumerate(items):
            ids = p.ids[:width]
            labels[r, :len(ids)] = torch.tensor(ids)
        return {"inputs": {"pixel_values": pixels}, "labels": labels, "truncated": truncated}

    def prompt_batch(self, items: list[Prepared], images: list[list]) -> dict:
        return {"pixel_values": self.processor.image_processor(images=[im[0] for im in images],
                                                               return_tensors="pt")["pixel_values"]}


ENCODINGS.register("chat")(ChatEncoding)
ENCODINGS.register("plain")(PlainEncoding)
ENCODINGS.register("prefix_suffix")(PrefixSuffixEncoding)
ENCODINGS.register("encoder_decoder")(EncoderDecoderEncoding)


def choose_encoding(name: str, processor, config: Any) -> str:
    """`auto` picks by the model's structure: encoder-decoder, prefix-LM family, chat template, plain."""
    if name != "auto":
        ENCODINGS.get(name)
        return name
    if getattr(config, "is_encoder_decoder", False):
        return "encoder_decoder"
    if getattr(config, "model_type", None) in PREFIX_SUFFIX_TYPES:
        return "prefix_suffix"
    if getattr(processor, "chat_template", None):
        return "chat"
    return "plain"


def build_encoding(name: str, processor, config: Any, image_ids: set[int]):
    chosen = choose_encoding(name, processor, config)
    first = None
    if getattr(config, "model_type", None) in DECODER_BOS_TYPES:
        first = getattr(getattr(config, "text_config", config), "bos_token_id", None)
    if chosen == "chat" and not getattr(processor, "chat_template", None):
        raise ConfigError("encoding 'chat' needs a chat template: the processor has none (set task.chat_template)")
    return ENCODINGS.get(chosen)(processor, image_ids, first)


def _masked_tokens(tokenizer, text: str, spans: list[tuple[int, int]], add_special: bool,
                   label_trailing_special: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of `text` and a mask of the tokens overlapping `spans` (a token overlapping a reply is
    the reply's: byte-level BPE glues the leading space onto it). `label_trailing_special` also labels
    the special tokens the tokenizer appends after the last span (EOS/SEP: the model must learn to stop)."""
    enc = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = enc["offset_mapping"]
    mask = [int(any(s < b and e > a for a, b in spans)) for s, e in offsets]
    if label_trailing_special and spans:
        for k in range(len(ids) - 1, -1, -1):
            s, e = offsets[k]
            if s == e == 0 and ids[k] in tokenizer.all_special_ids:
                mask[k] = 1
            else:
                break
    return ids, mask


def _eos_and_pad(processor) -> dict:
    tok = processor.tokenizer
    return {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def _require_target(sample: VisualConversation, tokenizer) -> None:
    """Every assistant reply must keep at least one token of its own (end-of-turn tokens do not count:
    a reply that the tokenizer's normalizer erases would teach only to stop)."""
    for message in sample.messages:
        if message["role"] != "assistant":
            continue
        text = " ".join(p["text"] for p in message["content"] if p["type"] == "text")
        if not tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise DataError(f"sample {sample.id}: the answer tokenizes to nothing ({text[:40]!r})")


def _with_labels(enc: dict, items: list[Prepared], image_ids: set[int], max_length: Optional[int]) -> dict:
    ids = enc["input_ids"]
    lengths = enc["attention_mask"].sum(1).tolist() if "attention_mask" in enc else [ids.shape[1]] * len(ids)
    labels = torch.full_like(ids, IGNORE)
    for r, p in enumerate(items):
        n = int(lengths[r])
        labels[r, :n] = torch.tensor(transfer_labels(p.ids, p.mask, ids[r, :n].tolist(), p.sample.id))
    inputs, labels, truncated = _truncate(enc, labels, max_length, image_ids, [p.sample for p in items])
    return {"inputs": inputs, "labels": labels, "truncated": truncated}
