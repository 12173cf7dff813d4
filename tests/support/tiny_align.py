"""Tiny CLIP/SigLIP models saved like a user's checkpoint, and image-text pair sets made here."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "circle")
WORDS = "a photo of the small big".split() + list(COLORS) + list(SHAPES)


def word_tokenizer(pad: str = "<pad>", unk: str = "<unk>", bos: str = "<s>", eos: str = "</s>", extra=()):
    """A word-level tokenizer over the captions' words, built locally (no hub): `bos text eos`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([pad, unk, bos, eos, *extra] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A {eos}", special_tokens=[(bos, 2), (eos, 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos,
                                   eos_token=eos, model_max_length=16)


def _tower_configs(vocab_size: int) -> tuple[dict, dict]:
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    return text, vision


def save_tiny_clip(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    tok = word_tokenizer()
    text, vision = _tower_configs(len(tok))
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def save_tiny_siglip(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    torch.manual_seed(seed)
    tok = word_tokenizer()
    text, vision = _tower_configs(len(tok))
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    processor = SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def draw(color: str, shape: str, rng, size: int = 32) -> Image.Image:
    """A colored shape on a noisy grey background, at a random place."""
    bg = np.clip(rng.normal(128, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(7, 10))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    box = (cx - r, cy - r, cx + r, cy + r)
    (d.rectangle if shape == "square" else d.ellipse)(box, fill=COLORS[color])
    return img


def make_pair_set(root: Path, per_kind: int = 6, seed: int = 0, extra_rows=()) -> Path:
    """Pairs `a photo of a <color> <shape>` (8 kinds, so captions repeat), a group per image and the
    color as a label column (for zero-shot accuracy)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for color in COLORS:
        for shape in SHAPES:
            for i in range(per_kind):
                name = f"{color}_{shape}_{i}.png"
                draw(color, shape, rng).save(root / name)
                rows.append({"image": name, "text": f"a photo of a {color} {shape}", "group": f"g{len(rows) % 16}",
                             "label": color})
    rows += list(extra_rows)
    manifest = root / "pairs.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text", "group", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def save_tiny_bert(out: Path, seed: int = 0) -> Path:
    """A 2-layer BERT text encoder with a word-level tokenizer ([CLS] text [SEP]) over the captions' words."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer("[PAD]", "[UNK]", "[CLS]", "[SEP]", extra=["[MASK]"])
    tokenizer.cls_token, tokenizer.sep_token, tokenizer.mask_token = "[CLS]", "[SEP]", "[MASK]"
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=32))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def save_tiny_sentence_encoder(out: Path, seed: int = 0) -> Path:
    """The tiny BERT in the sentence-transformers folder layout (`modules.json`, mean pooling)."""
    import json

    save_tiny_bert(out, seed)
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                               "pooling_mode_mean_tokens": True}))
    return out
