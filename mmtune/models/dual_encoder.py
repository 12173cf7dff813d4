"""Dual encoder: a timm image backbone and a transformers text encoder, each with a projection head.

Exported as a folder (`mmtune_dual_encoder.json` marks it) with the image backbone in timm's
`save_for_hf` layout (`image/`), the text encoder and its tokenizer by `save_pretrained` (`text/`), and
the heads, temperature and bias in `heads.safetensors`; `ModelSpec(name=<folder>)` loads it back.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.errors import ConfigError, ModelError
from mmtune.models.hf import refusing_custom_code, remote_code, save_pretrained_safetensors
from mmtune.specs import ModelSpec

DUAL_ENCODER_FILE = "mmtune_dual_encoder.json"


def pool_tokens(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor], pooling: str) -> torch.Tensor:
    """Mean over real tokens (padding excluded), or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


class DualEncoder(nn.Module):
    """Image backbone (pooled features) + text encoder (pooled tokens), projected to one space.

    Args:
        image: a timm model built with `num_classes=0` (its forward returns pooled features).
        text: a transformers encoder (`AutoModel`) returning `last_hidden_state`.
        embed_dim: size of the shared space.
        pooling: `mean` or `cls` text pooling.
        sigmoid: add a learnable `logit_bias` (SigLIP's loss); temperatures start as CLIP's (1/0.07)
            or SigLIP's (scale 10, bias -10).
    """

    def __init__(self, image: nn.Module, text: nn.Module, embed_dim: int = 256, pooling: str = "mean",
                 sigmoid: bool = False) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.image, self.text, self.pooling = image, text, pooling
        self.image_proj = nn.Linear(image.num_features, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.config.hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0) if sigmoid else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if sigmoid else None

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_proj(self.image(pixels))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_proj(pool_tokens(hidden, attention_mask, self.pooling))

    def head_state(self) -> dict[str, torch.Tensor]:
        state = {"image_proj.weight": self.image_proj.weight, "text_proj.weight": self.text_proj.weight,
                 "logit_scale": self.logit_scale}
        if self.logit_bias is not None:
            state["logit_bias"] = self.logit_bias
        return {k: v.detach().contiguous() for k, v in state.items()}


def build_dual_encoder(spec: ModelSpec, text_model: Optional[ModelSpec], options: dict):
    """A new dual encoder (`spec`: timm backbone, `text_model`: transformers encoder) or an exported one
    (`spec.name`: a folder with `mmtune_dual_encoder.json`). Returns (module, Preprocess, tokenizer)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from mmtune.data.transforms import AugmentSpec, build_transform
    from mmtune.models.aligners import Preprocess, _Tokenize
    from mmtune.models.vision import build_classifier

    folder = Path(spec.name)
    saved = folder / DUAL_ENCODER_FILE
    if text_model is None and saved.is_file():
        meta = json.loads(saved.read_text())
        image_spec = ModelSpec(name=str(folder / "image"))
        text_spec = ModelSpec(name=str(folder / "text"), trust_remote_code=spec.trust_remote_code)
        embed_dim, pooling, sigmoid = meta["embed_dim"], meta["pooling"], meta["sigmoid"]
    else:
        image_spec, text_spec = spec, text_model
        embed_dim, pooling, sigmoid = options["embed_dim"], options["pooling"], options["loss"] == "sigmoid"
    clf = build_classifier(image_spec, 0)
    if clf.family != "timm":
        raise ConfigError(f"a dual encoder's image backbone must be a timm model; {spec.name!r} is {clf.family}")
    code = remote_code(text_spec)
    try:
        with refusing_custom_code(text_spec):
            text = AutoModel.from_pretrained(text_spec.name, **code, **text_spec.kwargs) if text_spec.pretrained else \
                AutoModel.from_config(AutoConfig.from_pretrained(text_spec.name, **code), **code)
            tokenizer = AutoTokenizer.from_pretrained(text_spec.name, **code)
    except OSError as err:
        raise ModelError(f"cannot load the text encoder {text_spec.name!r} offline: {err}") from None
    module = DualEncoder(clf.module, text, embed_dim, pooling, sigmoid)
    if text_model is None and saved.is_file():
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(folder / "heads.safetensors")), strict=False)
    max_len = options.get("max_text_length") or min(tokenizer.model_max_length, text.config.max_position_embeddings)
    data_config = clf.data_config
    preprocess = Preprocess(build_transform(data_config, False, AugmentSpec()), _Tokenize(tokenizer, max_len, False),
                            channels=data_config["input_size"][0], image_config=dict(data_config))
    return module, preprocess, {"tokenizer": tokenizer, "embed_dim": embed_dim, "pooling": pooling, "sigmoid": sigmoid}


def export_dual_encoder(module: DualEncoder, extra: dict, out: Path) -> None:
    """Writes the folder layout described in the module docstring."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    save_for_hf(module.image, str(out / "image"), safe_serialization=True)
    save_pretrained_safetensors(module.text, out / "text")
    extra["tokenizer"].save_pretrained(out / "text")
    save_file(module.head_state(), str(out / "heads.safetensors"))
    (out / DUAL_ENCODER_FILE).write_text(json.dumps(
        {"embed_dim": extra["embed_dim"], "pooling": extra["pooling"], "sigmoid": extra["sigmoid"]}, indent=2))
