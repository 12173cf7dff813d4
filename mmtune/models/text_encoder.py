"""Sentence-transformers style text encoders (a transformers encoder + pooling) for embedding
fine-tuning, loaded from and exported to the sentence-transformers folder layout."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from mmtune.errors import ConfigError, ModelError
from mmtune.models.dual_encoder import pool_tokens
from mmtune.models.hf import refusing_custom_code, remote_code, save_pretrained_safetensors
from mmtune.specs import ModelSpec

ST_MARKER = "modules.json"  # what makes a folder a sentence-transformers model
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")


class SentenceEncoder(nn.Module):
    """Encoder + mean/CLS pooling; queries and documents share it. `logit_scale` starts at log(20),
    the scale of sentence-transformers' MultipleNegativesRankingLoss (temperature 0.05)."""

    def __init__(self, encoder: nn.Module, pooling: str) -> None:
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.logit_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        self.logit_bias = None

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_tokens(hidden, attention_mask, self.pooling)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise ConfigError("a sentence-transformers text encoder has no image tower: use query-document data")


def _pooling_of(folder: Path) -> str:
    """The pooling that the folder's `modules.json` names (mean or CLS token)."""
    modules = json.loads((folder / ST_MARKER).read_text())
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            cfg = json.loads((folder / m["path"] / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                return "cls"
            if cfg.get("pooling_mode_mean_tokens") or cfg.get("pooling_mode") == "mean":
                return "mean"
            raise ConfigError(f"{folder}: pooling {cfg} is not supported (mean or cls)")
    return "mean"


def build_sentence_encoder(spec: ModelSpec, text_model: Optional[ModelSpec], options: dict):
    """Loads a sentence-transformers folder. Returns (module, Preprocess, source folder)."""
    from transformers import AutoModel, AutoTokenizer

    from mmtune.models.aligners import Preprocess, _Tokenize

    folder = Path(spec.name)
    code = remote_code(spec)
    try:
        with refusing_custom_code(spec):
            encoder = AutoModel.from_pretrained(folder, **code, **spec.kwargs)
            tokenizer = AutoTokenizer.from_pretrained(folder, **code)
    except OSError as err:
        raise ModelError(f"cannot load the text encoder {spec.name!r}: {err}") from None
    st_cfg = folder / "sentence_bert_config.json"
    max_len = options.get("max_text_length") or (json.loads(st_cfg.read_text()).get("max_seq_length") if st_cfg.is_file() else None) \
        or min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
    module = SentenceEncoder(encoder, _pooling_of(folder))
    return module, Preprocess(None, _Tokenize(tokenizer, max_len, False)), {"source": folder, "tokenizer": tokenizer}


def export_sentence_encoder(module: SentenceEncoder, extra: dict, out: Path) -> None:
    """sentence-transformers layout: encoder weights and tokenizer at the root, plus the source's
    `modules.json`, configs and module folders (pooling, normalize)."""
    save_pretrained_safetensors(module.encoder, out)
    extra["tokenizer"].save_pretrained(out)
    source: Path = extra["source"]
    for name in ST_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    for m in json.loads((source / ST_MARKER).read_text()):
        if m.get("path") and (source / m["path"]).is_dir():
            shutil.copytree(source / m["path"], out / m["path"], dirs_exist_ok=True)
