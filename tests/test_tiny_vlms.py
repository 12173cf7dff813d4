"""The tiny VLM checkpoints of tests/support/tiny_vlms.py load back like a user's and run end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import tiny_vlms as tv


@pytest.fixture(scope="session")
def vlm_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_vlms")


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    return [Image.open(p).convert("RGB") for p in tv.make_images(2, tmp_path_factory.mktemp("vlm_images"))]


def test_images_and_captions(tmp_path):
    rows = tv.caption_rows(10, tmp_path)
    assert len(rows) == 10 and len({c for _, c in rows}) == 8
    for path, text in rows:
        color, shape = text.split()[1:]
        assert text == f"a {color} {shape}" and color in tv.COLORS and shape in tv.SHAPES
        with Image.open(path) as img:
            assert img.mode == "RGB" and img.size == (32, 32)
            pixels = np.asarray(img, dtype=float).reshape(-1, 3)
        # the caption's color is the one most pixels are close to (the rest is grey noise)
        near = {c: int((np.abs(pixels - rgb).max(1) < 30).sum()) for c, rgb in tv.COLORS.items()}
        assert max(near, key=near.get) == color and near[color] > 100
    again = tv.make_images(10, tmp_path / "again")
    assert [p.read_bytes() for p, _ in rows] == [p.read_bytes() for p in again]


def _loaded(family, root):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    out = tv.tiny_vlm_dir(family, root)
    assert tv.tiny_vlm_dir(family, root) == out  # cached: built once per directory
    assert tv.AUTO_CLASS[family] == "AutoModelForImageTextToText"
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == tv.PROCESSOR_CLASS[family]
    if family == "vision_encoder_decoder":  # no processor class: image processor and tokenizer side by side
        processor = (AutoImageProcessor.from_pretrained(out), AutoTokenizer.from_pretrained(out))
    return model, processor


def _batches(family, processor, images):
    """(training batch with labels, generation batch, number of images per sample)."""
    caption = "a red square"
    if family == "vision_encoder_decoder":
        image_processor, tok = processor
        assert tok.pad_token is None  # like GPT-2 checkpoints: the trainer must pick one (eos)
        pixels = image_processor(images=images[:1], return_tensors="pt").pixel_values
        labels = tok([caption + tok.eos_token], return_tensors="pt").input_ids
        return {"pixel_values": pixels, "labels": labels}, {"pixel_values": pixels}, 1
    if family == "blip":
        train = processor(images=images[:1], text=[caption], return_tensors="pt")
        assert processor.tokenizer.convert_ids_to_tokens(train.input_ids[0])[::len(train.input_ids[0]) - 1] == \
            ["[CLS]", "[SEP]"]
        train["labels"] = train.input_ids.masked_fill(train.attention_mask == 0, -100)
        return train, processor(images=images[:1], return_tensors="pt"), 1
    if family == "paligemma":  # prefix + suffix; the processor makes the labels (prefix and image masked)
        train = processor(images=images[:1], text=["<image>caption en"], suffix=[caption], return_tensors="pt")
        assert (train.labels != -100).sum() == len(processor.tokenizer(caption).input_ids) + 1  # caption + eos
        return train, processor(images=images[:1], text=["<image>caption en"], return_tensors="pt"), 1
    n = 2 if family in tv.MULTI_IMAGE else 1
    user = {"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": "What is in the picture?"}]}
    answer = {"role": "assistant", "content": [{"type": "text", "text": caption}]}
    text = processor.apply_chat_template([user, answer], tokenize=False)
    prompt = processor.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)
    assert caption in text[len(prompt) - 1:]
    train = processor(images=[images[:n]], text=[text], return_tensors="pt")
    train["labels"] = train.input_ids.masked_fill(train.input_ids == processor.image_token_id, -100)
    return train, processor(images=[images[:n]], text=[prompt], return_tensors="pt"), n


@pytest.mark.parametrize("family", tv.FAMILIES)
def test_tiny_vlm(family, vlm_root, images):
    torch.manual_seed(0)
    model, processor = _loaded(family, vlm_root)
    assert type(model).__name__ == tv.MODEL_CLASS[family]
    for part, path in tv.PARTS[family].items():
        if path:
            model.get_submodule(path)
    assert tv.linear_names(model, family) == tv.LINEAR_NAMES[family]

    tok = processor[1] if isinstance(processor, tuple) else processor.tokenizer
    if tv.HAS_CHAT_TEMPLATE[family]:
        assert processor.chat_template and tok.chat_template
    else:
        assert not getattr(processor, "chat_template", None) and not tok.chat_template

    train, gen, n = _batches(family, processor, images)
    if tv.IMAGE_TOKEN[family]:
        image_id = tok.convert_tokens_to_ids(tv.IMAGE_TOKEN[family])
        assert (train.input_ids == image_id).sum() == n * tv.TOKENS_PER_IMAGE[family]

    out = model(**train)
    assert math.isfinite(out.loss.item()) and out.loss.item() > 0
    out.loss.backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    assert no_grad == {n for n, _ in model.named_parameters()
                       if any(n.startswith(prefix) for prefix in tv.UNUSED_PARAMS.get(family, ()))}
    vision = model.get_submodule(tv.PARTS[family]["vision"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision.parameters())

    # the output depends on the image (BLIP's default vision init of 1e-10 would make it nearly constant)
    with torch.no_grad():
        other = {k: v.flip(-1) if k == "pixel_values" else v for k, v in train.items()}
        assert (model(**other).logits - out.logits).abs().max() > 1e-3

    with torch.no_grad():
        seq = model.generate(**gen, max_new_tokens=3, do_sample=False)
    start = gen["input_ids"].shape[1] if "input_ids" in gen and family != "blip" else 1
    assert start < seq.shape[1] <= start + 3
    if family not in ("blip", "vision_encoder_decoder"):
        assert torch.equal(seq[:, :start], gen["input_ids"])


def test_llava_assistant_mask(vlm_root, images):
    """Llava's template has {% generation %} markers: the processor returns an assistant-token mask."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tv.tiny_vlm_dir("llava", vlm_root))
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "text", "text": "Describe the image."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        return_tensors="pt")
    masked = out.input_ids[0][out.assistant_masks[0].bool()]
    assert processor.tokenizer.decode(masked).strip() == "a red square"
