"""Image-text aligners behind one dual-encoder contract: `encode_image(pixels)`,
`encode_text(input_ids, attention_mask)`, `logit_scale` (log inverse temperature) and `logit_bias`
(None unless the family uses a sigmoid loss).

Families are registered by name: transformers models by their config's `model_type` (`clip`,
`siglip`: read from config.json, never guessed from the model name), and `dual_encoder` (a timm image
backbone plus a transformers text encoder, `mmtune.models.dual_encoder`). Each family says how to
build the model, how to preprocess images and texts, which named parts it has for `apply_adapter`, its
default loss, and how to export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from mmtune.adapters.targets import DEFAULT_TARGETS
from mmtune.errors import ModelError
from mmtune.models.hf import refusing_custom_code, remote_code, save_pretrained_safetensors
from mmtune.registry import Registry
from mmtune.specs import ModelSpec


@dataclass
class Preprocess:
    """What the data module needs from the model: PIL image -> tensor, and texts -> token batch.

    Attributes:
        image: PIL image -> [C, H, W] tensor (None for text-only encoders).
        text: list of strings -> dict of tensors (`input_ids`, `attention_mask`).
        channels: image channels the model expects.
        image_config: timm-style data config of the image input (`input_size`, `mean`, `std`,
            `interpolation`), from which the data module builds its augmented training transform.
    """

    image: Optional[Callable[[Any], torch.Tensor]]
    text: Callable[[list[str]], dict[str, torch.Tensor]]
    channels: int = 3
    image_config: Optional[dict] = None


def image_processor_config(image_processor) -> dict:
    """A transformers image processor's input size and normalization as a timm data config, so CLIP and
    SigLIP pairs train with the same augmentation code as timm backbones."""
    size = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
    size = size or image_processor.size
    size = dict(size) if not isinstance(size, int) else {"height": size, "width": size}
    side = size.get("shortest_edge")
    height, width = (side, side) if side else (size["height"], size["width"])
    return {"input_size": (3, int(height), int(width)), "mean": tuple(image_processor.image_mean),
            "std": tuple(image_processor.image_std), "interpolation": "bicubic", "crop_pct": 1.0}


@dataclass
class AlignerFamily:
    """A registered family of aligners.

    Attributes:
        build: (model spec, text model spec, options) -> (module with the contract, Preprocess, extra),
            where `extra` is what `export` needs besides the module (e.g. the processor).
        parts: part name -> module-path prefixes in the module (one `None` catch-all), for `apply_adapter`.
        loss: default loss, `infonce` or `sigmoid`.
        export: (merged module, extra, out dir) -> None, writing the family's native format.
        targets: key of the default adapter target table.
    """

    build: Callable[[ModelSpec, Optional[ModelSpec], dict], tuple[nn.Module, Preprocess, Any]]
    parts: dict[str, Optional[list[str]]]
    loss: str
    export: Callable[[nn.Module, Any, Path], None]
    targets: str


ALIGNERS: Registry[AlignerFamily] = Registry("image-text aligner family")


def resolve_aligner(spec: ModelSpec, text_model: Optional[ModelSpec] = None) -> str:
    """The family name of a model reference (checked without loading weights)."""
    from mmtune.models.dual_encoder import DUAL_ENCODER_FILE

    from mmtune.models.text_encoder import ST_MARKER

    if text_model is not None or (Path(spec.name).is_dir() and (Path(spec.name) / DUAL_ENCODER_FILE).is_file()):
        return "dual_encoder"
    if Path(spec.name).is_dir() and (Path(spec.name) / ST_MARKER).is_file():
        return "sentence_transformers"
    from transformers import AutoConfig

    try:
        with refusing_custom_code(spec):
            model_type = AutoConfig.from_pretrained(spec.name, **remote_code(spec)).model_type
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the config of {spec.name!r} (a hub id needs the network or a local copy; "
                         f"a local directory needs config.json): {err}") from None
    ALIGNERS.get(model_type)  # a clear error listing the known families
    return model_type


class TransformersAligner(nn.Module):
    """A transformers CLIPModel/SiglipModel with the dual-encoder contract (the model stays at
    `.model`, so a merged one saves with its own `save_pretrained`)."""

    def __init__(self, model: nn.Module, has_bias: bool) -> None:
        super().__init__()
        self.model = model
        self.has_bias = has_bias

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale

    @property
    def logit_bias(self) -> Optional[torch.Tensor]:
        return self.model.logit_bias if self.has_bias else None


class _ImageProcessorTransform:
    """PIL image -> pixel tensor through a transformers image processor (picklable for workers)."""

    def __init__(self, image_processor) -> None:
        self.image_processor = image_processor

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class _Tokenize:
    """Texts -> padded token batch; `pad_to_max` for models that pool a fixed position (SigLIP)."""

    def __init__(self, tokenizer, max_length: int, pad_to_max: bool) -> None:
        self.tokenizer, self.max_length, self.pad_to_max = tokenizer, max_length, pad_to_max

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length" if self.pad_to_max else "longest", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def _build_transformers(pad_to_max: bool, has_bias: bool):
    def build(spec: ModelSpec, text_model: Optional[ModelSpec], options: dict):
        from transformers import AutoConfig, AutoModel, AutoProcessor

        code = remote_code(spec)
        try:
            with refusing_custom_code(spec):
                processor = AutoProcessor.from_pretrained(spec.name, **code)
                if spec.pretrained:
                    model = AutoModel.from_pretrained(spec.checkpoint or spec.name, **code, **spec.kwargs)
                else:
                    model = AutoModel.from_config(AutoConfig.from_pretrained(spec.name, **code), **code, **spec.kwargs)
        except OSError as err:
            raise ModelError(f"cannot load {spec.name!r} offline: {err}") from None
        max_len = options.get("max_text_length") or model.config.text_config.max_position_embeddings
        preprocess = Preprocess(_ImageProcessorTransform(processor.image_processor),
                                _Tokenize(processor.tokenizer, max_len, pad_to_max),
                                image_config=image_processor_config(processor.image_processor))
        return TransformersAligner(model, has_bias), preprocess, processor

    return build


def _export_transformers(module: nn.Module, processor, out: Path) -> None:
    save_pretrained_safetensors(module.model, out)
    processor.save_pretrained(out)


TOWER_LAYERS = re.compile(r".*\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc1|mlp\.fc2)")


@DEFAULT_TARGETS.register("clip_towers")
def clip_tower_targets(candidates: dict[str, nn.Module]) -> list[str]:
    """CLIP/SigLIP towers: attention q/k/v/out and MLP fc1/fc2 of every encoder layer. Not SigLIP's
    attention-pooling head: its `nn.MultiheadAttention` reads `out_proj.weight` directly, so a LoRA
    there would be skipped silently."""
    return [n for n, m in candidates.items() if isinstance(m, nn.Linear) and TOWER_LAYERS.fullmatch(n)]


_HF_PARTS = {"vision": ["model.vision_model"], "text": ["model.text_model"], "projection": None}
ALIGNERS.register("clip")(AlignerFamily(_build_transformers(False, False), _HF_PARTS, "infonce",
                                         _export_transformers, "clip_towers"))
ALIGNERS.register("siglip")(AlignerFamily(_build_transformers(True, True), _HF_PARTS, "sigmoid",
                                           _export_transformers, "clip_towers"))


@DEFAULT_TARGETS.register("dual_encoder")
def dual_encoder_targets(candidates: dict[str, nn.Module]) -> list[str]:
    """The image backbone's timm defaults (linears, else convs) plus every linear of the text encoder."""
    from mmtune.adapters.targets import vision_backbone_targets

    image = {n: m for n, m in candidates.items() if n.startswith("image.")}
    text = [n for n, m in candidates.items() if n.startswith("text.") and isinstance(m, nn.Linear)]
    return vision_backbone_targets(image) + text


def _build_dual(spec: ModelSpec, text_model: Optional[ModelSpec], options: dict):
    from mmtune.models.dual_encoder import build_dual_encoder

    return build_dual_encoder(spec, text_model, options)


def _export_dual(module: nn.Module, extra, out: Path) -> None:
    from mmtune.models.dual_encoder import export_dual_encoder

    export_dual_encoder(module, extra, out)


ALIGNERS.register("dual_encoder")(AlignerFamily(
    _build_dual, {"vision": ["image"], "text": ["text"], "projection": None}, "infonce", _export_dual, "dual_encoder"))


def _build_sentence(spec: ModelSpec, text_model: Optional[ModelSpec], options: dict):
    from mmtune.models.text_encoder import build_sentence_encoder

    return build_sentence_encoder(spec, text_model, options)


def _export_sentence(module: nn.Module, extra, out: Path) -> None:
    from mmtune.models.text_encoder import export_sentence_encoder

    export_sentence_encoder(module, extra, out)


@DEFAULT_TARGETS.register("text_encoder")
def text_encoder_targets(candidates: dict[str, nn.Module]) -> list[str]:
    """Every linear of the encoder except BERT's pooler (sentence-transformers pools tokens itself)."""
    return [n for n, m in candidates.items() if isinstance(m, nn.Linear) and ".pooler." not in n]


ALIGNERS.register("sentence_transformers")(AlignerFamily(
    _build_sentence, {"text": ["encoder"], "projection": None}, "infonce", _export_sentence, "text_encoder"))
