"""Vision-language models (BLIP, VisionEncoderDecoder, LLaVA, Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL,
PaliGemma, ...) and their processors, through transformers' Auto classes.

Every model goes through `AutoModelForImageTextToText` and `AutoProcessor`; nothing is chosen from
a model's name. The parts (vision tower, projector, language model, embeddings, head) are found by
the submodule names transformers uses across families, so per-part freezing, adapters and learning
rates work for any model that follows them, and a model that does not gets a clear error.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmtune.data.text_tokens import IGNORE
from mmtune.errors import ModelError
from mmtune.models.hf import _dtype, _offline_error, quantization_config, refusing_custom_code, remote_code, resolve_hf_ref
from mmtune.specs import ModelSpec

# Submodule names transformers uses for each part, most specific first. The projector is looked up
# before the vision tower because some families nest it inside the tower (Qwen2-VL's `visual.merger`).
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "merger", "mm_projector", "enc_to_dec_proj")
VISION_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder", "image_encoder", "encoder")
LANGUAGE_NAMES = ("language_model", "text_decoder", "text_model", "decoder")
PARTS_DOC = {"vision": "the vision tower (image encoder)", "projector": "the projector/connector into the language model",
             "language": "the language model's blocks", "embeddings": "input token embeddings",
             "head": "the output projection (lm_head)"}


def load_vlm(spec: ModelSpec, quantize: bool = True) -> nn.Module:
    """An `AutoModelForImageTextToText` from a hub id or a `save_pretrained` directory (random
    weights with `pretrained: false`). `kwargs` go to `from_pretrained`."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    ref = resolve_hf_ref(spec)
    kwargs = dict(spec.kwargs)
    quant = quantization_config(spec) if quantize else None
    code = remote_code(spec)
    try:
        with refusing_custom_code(spec):
            if not spec.pretrained:
                config = AutoConfig.from_pretrained(ref.path, **code)
                return AutoModelForImageTextToText.from_config(config, dtype=_dtype(spec), **code, **kwargs)
            if quant is not None:
                kwargs["quantization_config"] = quant
            return AutoModelForImageTextToText.from_pretrained(ref.path, dtype=_dtype(spec), **code, **kwargs)
    except OSError as err:
        raise _offline_error(spec.name, err) from err
    except ValueError as err:
        if "Unrecognized configuration class" in str(err):
            raise ModelError(f"{spec.name!r} is not an image-text-to-text model that transformers knows "
                             f"(AutoModelForImageTextToText cannot load it): {str(err)[:200]}") from None
        raise


def load_processor(spec: ModelSpec, chat_template: Optional[str] = None):
    """The model's own processor (image processor + tokenizer), with a padding token.

    Args:
        spec: the model reference.
        chat_template: a Jinja chat template replacing the processor's own (None keeps it).
    """
    from transformers import AutoProcessor

    ref = resolve_hf_ref(spec)
    code = remote_code(spec)
    try:
        with refusing_custom_code(spec):
            processor = AutoProcessor.from_pretrained(ref.path, **code)
            if getattr(processor, "image_processor", None) is None:
                processor = _pair_processor(ref.path, processor, code)
    except OSError as err:
        raise _offline_error(spec.name, err) from err
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ModelError(f"{spec.name}: AutoProcessor gave {type(processor).__name__}, which lacks a tokenizer or an "
                         "image processor; save both with the model (a ProcessorMixin's save_pretrained does)")
    if chat_template is not None:
        processor.chat_template = chat_template
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked from attention and loss
    return processor


def _pair_processor(path: str, loaded, code: dict):
    """An image processor and a tokenizer saved side by side (VisionEncoderDecoder checkpoints have no
    processor class), joined in transformers' generic two-part processor so they save and reload
    together with `AutoProcessor`. `code`: the `trust_remote_code` argument (`remote_code`)."""
    from transformers import AutoImageProcessor, AutoTokenizer, VisionTextDualEncoderProcessor

    tokenizer = getattr(loaded, "tokenizer", None) or (loaded if hasattr(loaded, "convert_tokens_to_ids") else None)
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(path, **code)
    return VisionTextDualEncoderProcessor(image_processor=AutoImageProcessor.from_pretrained(path, **code),
                                          tokenizer=tokenizer)


def _find(model: nn.Module, names: tuple[str, ...], skip: tuple[str, ...] = ()) -> Optional[str]:
    """The shortest module path whose last component is one of `names` (in order of preference)."""
    paths = [n for n, _ in model.named_modules() if n]
    for name in names:
        found = sorted((p for p in paths if p.rsplit(".", 1)[-1] == name
                        and not any(p == s or p.startswith(s + ".") for s in skip)), key=len)
        if found:
            return found[0]
    return None


def vlm_parts(model: nn.Module) -> dict[str, Optional[list[str]]]:
    """Module-path prefixes of each part for `apply_adapter`: projector, vision, embeddings, head,
    and `language` (everything else). Order matters: the projector is matched before the vision
    tower that may contain it.

    Raises:
        ModelError: no vision tower is found.
    """
    names = {id(m): n for n, m in model.named_modules()}
    embed = names.get(id(model.get_input_embeddings()))
    language = _find(model, LANGUAGE_NAMES)
    out_emb = model.get_output_embeddings()
    if out_emb is None and language and hasattr(model.get_submodule(language), "get_output_embeddings"):
        out_emb = model.get_submodule(language).get_output_embeddings()  # BLIP keeps its head in the text decoder
    head = names.get(id(out_emb)) if out_emb is not None else None
    projector = _find(model, PROJECTOR_NAMES, skip=tuple(p for p in (language,) if p))
    vision = _find(model, VISION_NAMES, skip=tuple(p for p in (language, projector) if p))
    if vision is None:
        raise ModelError(f"{type(model).__name__}: no vision tower found (looked for submodules named {VISION_NAMES})")
    parts: dict[str, Optional[list[str]]] = {}
    if projector:
        parts["projector"] = [projector]
    parts["vision"] = [vision]
    if embed:
        parts["embeddings"] = [embed]
    if head:
        parts["head"] = [head]
    parts["language"] = None
    return parts


def image_token_ids(processor, model: nn.Module) -> set[int]:
    """Token ids that stand for image content (never labeled, never counted as text)."""
    ids = set()
    tok = processor.tokenizer
    for attr in ("image_token", "boi_token", "eoi_token", "fake_image_token", "global_image_token", "vision_start_token",
                 "vision_end_token"):
        value = getattr(processor, attr, None) or getattr(tok, attr, None)
        if isinstance(value, str):
            token_id = tok.convert_tokens_to_ids(value)
            if isinstance(token_id, int) and token_id != tok.unk_token_id:
                ids.add(token_id)
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


# Families whose multimodal rotary positions are computed from the input ids and the attention mask
# (Qwen2-VL's 3-D rope): prompt tuning hands the model embeddings without ids, so image tokens would get
# text positions silently, and prefix tuning's longer mask breaks the position computation.
POSITIONS_FROM_IDS = frozenset({"qwen2_vl", "qwen2_5_vl"})


def takes_prompt_learning(model: nn.Module) -> bool:
    """Whether peft's prefix and prompt tuning apply to this VLM's language model: decoder-only
    families whose positions do not depend on the input ids (checked on tiny LLaVA and Idefics3)."""
    return not is_encoder_decoder(model) and getattr(model.config, "model_type", None) not in POSITIONS_FROM_IDS


def decoder_inputs_from_labels(labels: torch.Tensor, config) -> torch.Tensor:
    """An encoder-decoder's decoder inputs for its labels (labels shifted right after the start token), for
    models without `prepare_decoder_input_ids_from_labels`."""
    start = config.decoder_start_token_id
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    shifted = labels.new_full(labels.shape, pad)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == IGNORE, pad)
