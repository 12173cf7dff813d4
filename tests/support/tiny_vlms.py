"""Tiny vision-language models built here from configs (no hub), saved like a user's checkpoint.

`build_tiny_vlm(family, root)` writes `root/family` with `save_pretrained` of the model and of its processor
(tokenizer, image processor, chat template): the files a user's local checkpoint has. `tiny_vlm_dir` builds once
per directory (about 0.1 s a family once transformers is imported). Tokenizers are trained here with the
`tokenizers` library and wrapped in each family's real tokenizer class (Llama/Gemma: metaspace BPE with `<0xNN>`
byte fallback; GPT-2/Qwen2: byte-level BPE; BLIP: BERT WordPiece). Sizes: 2 layers everywhere, vision hidden 32
(ViT of ViT+GPT-2: 64), patch 8 on 32x32 images, LM hidden 64 with initializer_range 0.2 (vision towers 0.02).
`make_images` / `caption_rows` make images whose caption ("a red square") is predictable from the pixels.

What was read off the loaded models (transformers 5.23; all asserted by tests/test_tiny_vlms.py)
================================================================================================
Every family loads with AutoModelForImageTextToText (5.23 has no AutoModelForVision2Seq). Paths are dotted
submodule names of that loaded model; Linear names are relative to the repeated block (`layers.N.`/`blocks.N.`/
`layer.N.`/`h.N.`), see PARTS / LINEAR_NAMES / `linear_names`.

blip: BlipForConditionalGeneration, BlipProcessor (BertTokenizer + BlipImageProcessor), no chat template.
  vision `vision_model` (BlipVisionModel): self_attn.qkv, self_attn.projection, mlp.fc1, mlp.fc2
  projector: none (the text decoder cross-attends to the 17 vision states = 16 patches + CLS)
  LM `text_decoder` (BlipTextLMHeadModel, BERT names): attention.self.{query,key,value}, attention.output.dense,
    crossattention.self.{query,key,value}, crossattention.output.dense, intermediate.dense, output.dense,
    cls.predictions.transform.dense, cls.predictions.decoder (tied to the word embeddings)
  no image token in input_ids. Text is `[CLS] caption [SEP]`; tokenizer eos is None.
ViT+GPT-2 (vision_encoder_decoder): VisionEncoderDecoderModel; AutoProcessor returns only the GPT2Tokenizer (no
  processor class, as nlpconnect/vit-gpt2-image-captioning): load AutoImageProcessor (ViTImageProcessor) and
  AutoTokenizer. No chat template; tokenizer has no pad token (bos = eos = `<|endoftext|>`, also decoder_start).
  vision `encoder` (ViTModel): attention.{q_proj,k_proj,v_proj,o_proj}, mlp.fc1, mlp.fc2, pooler.dense
  projector: none (hidden sizes equal, so no enc_to_dec_proj); cross-attention in the decoder
  LM `decoder` (GPT2LMHeadModel, Conv1D not Linear): attn.c_attn, attn.c_proj, crossattention.c_attn,
    crossattention.q_attn, crossattention.c_proj, mlp.c_fc, mlp.c_proj, lm_head (tied to wte)
  no image token; the decoder sees 17 encoder states.
llava: LlavaForConditionalGeneration, LlavaProcessor (CLIPImageProcessor; the Llama tokenizer reloads as
  TokenizersBackend: transformers forces that for model_type llava), chat template yes, multi-image yes.
  vision `model.vision_tower` (CLIPVisionModel): self_attn.{q_proj,k_proj,v_proj,out_proj}, mlp.fc1, mlp.fc2
  projector `model.multi_modal_projector`: linear_1, linear_2
  LM `model.language_model` (LlamaModel): self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj; `lm_head` on top
  image token `<image>`: 16 per 32x32 image (vision_feature_layer -2, strategy "default" drops CLS).
  Template (llava-1.5-hf): "USER: <image>\n<image>\nText ASSISTANT: answer " (no eos after the answer, images
  before texts), generation prompt "ASSISTANT:", with {% generation %} markers (assistant masks work).
idefics3: Idefics3ForConditionalGeneration, Idefics3Processor (Idefics3ImageProcessor, do_image_splitting=False;
  GPT2Tokenizer), chat template yes (SmolVLM-Instruct), multi-image yes.
  vision `model.vision_model` (Idefics3VisionTransformer): self_attn.{q_proj,k_proj,v_proj,out_proj}, mlp.fc1/fc2
  projector `model.connector` (pixel shuffle, scale_factor 2): modality_projection.proj
  LM `model.text_model` (LlamaModel): self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj; `lm_head` on top
  image token `<image>`: 4 per 32x32 image (image_seq_len 4), wrapped as
  `<fake_token_around_image><global-img><image>x4<fake_token_around_image>` (7 tokens).
  Template: "<|im_start|>User:<image>Text<end_of_utterance>\nAssistant: answer<end_of_utterance>\n", generation
  prompt "Assistant:", no generation markers; eos `<end_of_utterance>`, pad `<|im_end|>`, bos `<|im_start|>`.
  Processor outputs pixel_values (batch, images, 3, 32, 32) plus pixel_attention_mask.
qwen2_vl / qwen2_5_vl: Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor /
  Qwen2_5_VLProcessor (both Qwen2VLImageProcessor + Qwen2VLVideoProcessor, patch 8, merge 2, min_pixels 256,
  max_pixels 1024; Qwen2Tokenizer), chat template yes (ChatML with default system prompt), multi-image yes.
  vision `model.visual`: attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (2.5: mlp.gate_proj, mlp.up_proj, mlp.down_proj);
    `model.visual.patch_embed.proj` is a Conv3d (a bare "proj" target would hit it too)
  projector `model.visual.merger` (inside the vision tower): mlp.0, mlp.2 (an nn.Sequential)
  LM `model.language_model`: self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj; `lm_head` on top
  image token `<|image_pad|>`: 4 per 32x32 image (4x4 patches merged 2x2), between `<|vision_start|>` and
  `<|vision_end|>`. Template: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n
  <|vision_start|><|image_pad|><|vision_end|>Text<|im_end|>\n<|im_start|>assistant\nanswer<|im_end|>\n",
  generation prompt "<|im_start|>assistant\n", no generation markers; eos `<|im_end|>`, pad `<|endoftext|>`.
  Processor outputs pixel_values as flat patches (n_patches, 384) plus image_grid_thw and mm_token_type_ids.
paligemma: PaliGemmaForConditionalGeneration, PaliGemmaProcessor (SiglipImageProcessor + GemmaTokenizer), no chat
  template: processor(images, text="<image>caption en", suffix="a red square") builds
  `<image>x16 <bos> prefix \n suffix <eos>` with token_type_ids (0 prefix, 1 suffix) and labels (-100 on prefix).
  vision `model.vision_tower` (SiglipVisionModel, no pooling head): self_attn.{q_proj,k_proj,v_proj,out_proj},
    mlp.fc1, mlp.fc2
  projector `model.multi_modal_projector`: linear
  LM `model.language_model` (GemmaModel): self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj; `lm_head` (tied)
  image token `<image>`: 16 per 32x32 image (image_seq_length). Tokenizer padding side left (others right).

Gotchas met
- In Llava, Idefics3 and PaliGemma the vision tower and the LM share names (q_proj, k_proj, v_proj): bare peft
  target names hit both towers; anchor regexes on the part paths above. BLIP: query/key/value also hit the
  cross-attention; ViT+GPT-2: the decoder layers are Conv1D (fan_in_fan_out).
- Qwen2-VL raises without `mm_token_type_ids`; Qwen2.5-VL SILENTLY falls back to 1-D positions (other logits).
  PaliGemma without `token_type_ids` silently attends causally over the prefix. Keep every processor output.
- BLIP: forward trains on input_ids as given (`[CLS] ...`) while generate() puts `[DEC]` (text_config.bos_token_id)
  in place of `[CLS]` and stops at `[SEP]` (sep_token_id): set input_ids[:, 0] = bos_token_id when training to
  match. The vision init defaults to 1e-10 (set 0.02 here; the test checks the logits depend on the image).
- Parameters that get no gradient (UNUSED_PARAMS; DDP needs find_unused_parameters or freezing them, and LoRA
  there learns nothing): ViT+GPT-2's `encoder.pooler` (the decoder reads last_hidden_state); Llava's last vision
  layer and post_layernorm, as in real Llava-1.5 (vision_feature_layer -2), which with 2 layers is half the tower.
- ViT+GPT-2: no pad token in the tokenizer.
- PaliGemma: the processor adds `<image>` plus 1,152 `<locNNNN>`/`<segNNN>` tokens, so it is built before the
  config; image_processor.image_seq_length is set by hand; pass "<image>" in the prefix or the processor warns.
- Llama-style tokenizers built from vocab/merges do not add `<s>` unless add_bos_token=True is passed.
- Qwen's merger Linears are `mlp.0`/`mlp.2`: the last component alone ("0", "2") as a peft target matches
  `blocks.0`/`layers.0` and peft raises (a Qwen2VLVisionBlock is not supported); use "mlp.0" or "merger.mlp.0".
- Batched generation needs left padding (the chat families' tokenizers pad right).

Learnability (measured, 2 CPU cores): LoRA r=8 on every Linear of LINEAR_NAMES (vision, projector, LM; not the
head), AdamW lr 3e-3, batch 8 of `caption_rows(64)` (prompt masked, caption + eos as labels), 300 steps: caption
loss from 6.5-9.4 down to 0.006-0.024 for every family (image-blind floor: ln 8 / caption tokens, 0.5-0.7), at
0.02-0.07 s/step. lr 1e-2 lowers it faster for ~50 steps, then diverges.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from tests.support.tiny_align import COLORS, SHAPES, draw

FAMILIES = ("blip", "vision_encoder_decoder", "llava", "idefics3", "qwen2_vl", "qwen2_5_vl", "paligemma")

# transformers 5.23 has no AutoModelForVision2Seq: every family loads through AutoModelForImageTextToText.
AUTO_CLASS = {family: "AutoModelForImageTextToText" for family in FAMILIES}

# Families whose real checkpoints ship a chat template (the others take plain prompts / PaliGemma's prefix+suffix).
HAS_CHAT_TEMPLATE = {"llava": True, "idefics3": True, "qwen2_vl": True, "qwen2_5_vl": True,
                     "blip": False, "vision_encoder_decoder": False, "paligemma": False}
MULTI_IMAGE = ("llava", "idefics3", "qwen2_vl", "qwen2_5_vl")

# The placeholder the processor expands, and how many tokens one 32x32 image becomes in input_ids.
IMAGE_TOKEN = {"blip": None, "vision_encoder_decoder": None, "llava": "<image>", "idefics3": "<image>",
               "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "paligemma": "<image>"}
TOKENS_PER_IMAGE = {"blip": 0, "vision_encoder_decoder": 0, "llava": 16, "idefics3": 4, "qwen2_vl": 4,
                    "qwen2_5_vl": 4, "paligemma": 16}

# Where the parts sit in the model loaded with AUTO_CLASS (dotted paths; None: the family has no such part).
# Qwen's projector (`merger`) sits inside its vision tower; BLIP and ViT+GPT-2 feed the image through the
# decoder's cross-attention instead of a projector.
PARTS = {
    "blip": {"vision": "vision_model", "projector": None, "language_model": "text_decoder"},
    "vision_encoder_decoder": {"vision": "encoder", "projector": None, "language_model": "decoder"},
    "llava": {"vision": "model.vision_tower", "projector": "model.multi_modal_projector",
              "language_model": "model.language_model"},
    "idefics3": {"vision": "model.vision_model", "projector": "model.connector", "language_model": "model.text_model"},
    "qwen2_vl": {"vision": "model.visual", "projector": "model.visual.merger",
                 "language_model": "model.language_model"},
    "qwen2_5_vl": {"vision": "model.visual", "projector": "model.visual.merger",
                   "language_model": "model.language_model"},
    "paligemma": {"vision": "model.vision_tower", "projector": "model.multi_modal_projector",
                  "language_model": "model.language_model"},
}

MODEL_CLASS = {"blip": "BlipForConditionalGeneration", "vision_encoder_decoder": "VisionEncoderDecoderModel",
               "llava": "LlavaForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
               "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "paligemma": "PaliGemmaForConditionalGeneration"}

# What AutoProcessor.from_pretrained(dir) returns (ViT+GPT-2 has no processor class: the tokenizer comes back;
# load AutoImageProcessor and AutoTokenizer separately, as for nlpconnect/vit-gpt2-image-captioning).
PROCESSOR_CLASS = {"blip": "BlipProcessor", "vision_encoder_decoder": "GPT2Tokenizer", "llava": "LlavaProcessor",
                   "idefics3": "Idefics3Processor", "qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                   "paligemma": "PaliGemmaProcessor"}

_LM = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
       "self_attn.v_proj"]
_SIGLIP_CLIP = ["mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.out_proj", "self_attn.q_proj", "self_attn.v_proj"]
# nn.Linear (GPT-2: Conv1D) names per part, relative to the repeated block (see `linear_names`), read off the loaded
# models. "head": Linear layers outside the parts (lm_head of the decoder-only families).
LINEAR_NAMES = {
    "blip": {"vision": ["mlp.fc1", "mlp.fc2", "self_attn.projection", "self_attn.qkv"],
             "language_model": ["attention.output.dense", "attention.self.key", "attention.self.query",
                                "attention.self.value", "cls.predictions.decoder", "cls.predictions.transform.dense",
                                "crossattention.output.dense", "crossattention.self.key", "crossattention.self.query",
                                "crossattention.self.value", "intermediate.dense", "output.dense"],
             "head": []},
    "vision_encoder_decoder": {
        "vision": ["attention.k_proj", "attention.o_proj", "attention.q_proj", "attention.v_proj", "mlp.fc1", "mlp.fc2",
                   "pooler.dense"],
        "language_model": ["attn.c_attn", "attn.c_proj", "crossattention.c_attn", "crossattention.c_proj",
                           "crossattention.q_attn", "lm_head", "mlp.c_fc", "mlp.c_proj"],
        "head": []},
    "llava": {"vision": _SIGLIP_CLIP, "projector": ["linear_1", "linear_2"], "language_model": _LM,
              "head": ["lm_head"]},
    "idefics3": {"vision": _SIGLIP_CLIP, "projector": ["modality_projection.proj"], "language_model": _LM,
                 "head": ["lm_head"]},
    "qwen2_vl": {"vision": ["attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2"], "projector": ["mlp.0", "mlp.2"],
                 "language_model": _LM, "head": ["lm_head"]},
    "qwen2_5_vl": {"vision": ["attn.proj", "attn.qkv", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj"],
                   "projector": ["mlp.0", "mlp.2"], "language_model": _LM, "head": ["lm_head"]},
    "paligemma": {"vision": _SIGLIP_CLIP, "projector": ["linear"], "language_model": _LM, "head": ["lm_head"]},
}

# Parameter-name prefixes that get no gradient from the loss (see the docstring); every other parameter does.
UNUSED_PARAMS = {"vision_encoder_decoder": ["encoder.pooler."],
                 "llava": ["model.vision_tower.encoder.layers.1.", "model.vision_tower.post_layernorm."]}

IMAGE_SIZE = 32
PROMPTS = ("Describe the image.", "What is in the picture?", "What color is the shape?", "caption en",
           "Compare the two images.", "What shape is it?")

# ---------------------------------------------------------------- chat templates (shapes of the hub's templates)

# llava-hf/llava-1.5-7b-hf (processor chat_template.json), images first then texts, with generation markers.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM-Instruct (Idefics3): "User:<image>text<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Qwen/Qwen2-VL-2B-Instruct and Qwen2.5-VL (ChatML, default system prompt, vision placeholders).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN2_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# ---------------------------------------------------------------- images and captions


def caption(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def make_images(n: int, root: Path, size: int = IMAGE_SIZE, seed: int = 0) -> list[Path]:
    """`n` RGB PNGs of a colored square or circle on a noisy grey background, cycling through the 8 kinds;
    the file name names the kind (`003_red_circle.png`)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    kinds = [(c, s) for c in COLORS for s in SHAPES]
    paths = []
    for i in range(n):
        color, shape = kinds[i % len(kinds)]
        path = root / f"{i:03d}_{color}_{shape}.png"
        draw(color, shape, rng, size=size).save(path)
        paths.append(path)
    return paths


def caption_rows(n: int, root: Path, size: int = IMAGE_SIZE, seed: int = 0) -> list[tuple[Path, str]]:
    """(image path, caption) pairs whose caption (`a red square`) is predictable from the image."""
    return [(p, caption(*p.stem.split("_")[1:])) for p in make_images(n, root, size=size, seed=seed)]


# ---------------------------------------------------------------- tokenizers trained here


def _corpus() -> list[str]:
    captions = [caption(c, s) for c in COLORS for s in SHAPES]
    chat = ["USER: ASSISTANT: User: Assistant: user assistant system You are a helpful assistant.",
            "Picture 1: Picture 2: Video 1: the image a photo of a small big answer en",
            "system\nYou are", "user\nCompare", "assistant\na red", "Describe\nWhat", "\nAssistant: a red"]
    return captions * 20 + [" ".join(PROMPTS)] * 10 + chat * 10 + ["0 1 2 3 4 5 6 7 8 9 . , : ? ! \n"] * 5


def _train_byte_level(specials: list[str], vocab_size: int = 400) -> tuple[dict, list]:
    """Vocab and merges of a byte-level BPE (GPT-2 / Qwen2 style) trained on the test vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok.get_vocab(), [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]


def _train_metaspace(specials: list[str], vocab_size: int = 450) -> tuple[dict, list]:
    """Vocab and merges of a sentencepiece-like BPE (Llama / Gemma style: `▁` for spaces, `<0xNN>` byte
    fallback tokens) trained on the test vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    return tok.get_vocab(), [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]


def _add_special(tok, tokens: list[str]) -> None:
    from tokenizers import AddedToken

    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False, special=True)
                                                          for t in tokens]})


def _ids(tok, *tokens: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in ids or tok.unk_token_id is None, (tokens, ids)
    return ids


# ---------------------------------------------------------------- shared tiny sizes

LM_INIT = 0.2  # larger than the default 0.02 so a frozen random lm_head leaves LoRA room to lower the loss


def _lm(**kwargs) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, initializer_range=LM_INIT, **kwargs)


def _vit(**kwargs) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=IMAGE_SIZE, patch_size=8, initializer_range=0.02, **kwargs)


# ---------------------------------------------------------------- families


def _llava():
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlamaTokenizer, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    vocab, merges = _train_metaspace(["<unk>", "<s>", "</s>"])
    tok = LlamaTokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                         legacy=False, add_bos_token=True, add_eos_token=False)
    _add_special(tok, ["<image>"])
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.chat_template = LLAVA_TEMPLATE
    image_token_id, = _ids(tok, "<image>")
    text = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **_lm())
    vision = CLIPVisionConfig(projection_dim=32, **_vit())
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                         image_seq_length=TOKENS_PER_IMAGE["llava"], vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE)
    return LlavaForConditionalGeneration(config), processor


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_byte_level(QWEN2_VL_SPECIAL)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    _add_special(tok, QWEN2_VL_SPECIAL)
    tok.chat_template = QWEN2_VL_TEMPLATE
    return tok


def _qwen2_vl(version: str = "qwen2_vl"):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    tok = _qwen_tokenizer()
    image, video, start, end, bos = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                         "<|vision_end|>", "<|endoftext|>")
    # head_dim 16: mrope_section (temporal, height, width) must sum to head_dim / 2.
    text = _lm(vocab_size=len(tok), bos_token_id=bos, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
    pixels = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=IMAGE_SIZE ** 2)
    if version == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        config_cls, model_cls, proc_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1])
        config_cls, model_cls, proc_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    config = config_cls(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                        vision_start_token_id=start, vision_end_token_id=end, tie_word_embeddings=False)
    processor = proc_cls(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                         video_processor=Qwen2VLVideoProcessor(**pixels), chat_template=QWEN2_VL_TEMPLATE)
    return model_cls(config), processor


def _idefics3():
    """SmolVLM-style Idefics3: GPT-2 tokenizer with the image/row-col special tokens, no image splitting."""
    from transformers import (GPT2Tokenizer, Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessor, Idefics3Processor, LlamaConfig)

    grid = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                "<end_of_utterance>", "<global-img>", *grid]
    vocab, merges = _train_byte_level(specials, vocab_size=450)
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                        eos_token="<end_of_utterance>", pad_token="<|im_end|>")
    _add_special(tok, specials[3:])
    tok.chat_template = IDEFICS3_TEMPLATE
    image_token_id, = _ids(tok, "<image>")
    text = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **_lm())
    # 32x32 image, patch 8: 16 patches; pixel shuffle with scale_factor 2 -> 4 image tokens (image_seq_len).
    vision = _vit(hidden_act="gelu_pytorch_tanh")
    config = Idefics3Config(vision_config=vision, text_config=text, image_token_id=image_token_id, scale_factor=2,
                            tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    image_processor = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                             max_image_size={"longest_edge": IMAGE_SIZE})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=TOKENS_PER_IMAGE["idefics3"], chat_template=IDEFICS3_TEMPLATE)
    return Idefics3ForConditionalGeneration(config), processor


def _paligemma():
    """PaliGemma (SigLIP + Gemma). The processor adds `<image>` and 1,152 `<locNNNN>`/`<segNNN>` tokens to the
    tokenizer, so it is built before the model config (vocab_size = len(tokenizer) afterwards)."""
    from transformers import (GemmaConfig, GemmaTokenizer, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessor, SiglipVisionConfig)

    vocab, merges = _train_metaspace(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = TOKENS_PER_IMAGE["paligemma"]  # (32 / 8) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    image_token_id, = _ids(tok, "<image>")
    text = GemmaConfig(vocab_size=len(tok), head_dim=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **_lm())
    vision = SiglipVisionConfig(vision_use_head=False, **_vit())  # as in real PaliGemma (no pooling head)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                             vocab_size=len(tok), projection_dim=64, hidden_size=64, pad_token_id=tok.pad_token_id)
    return PaliGemmaForConditionalGeneration(config), processor


def _blip():
    """BLIP captioning: BERT WordPiece tokenizer (`[CLS] text [SEP]`) plus `[DEC]` (the decoder's bos, which
    `generate` puts in place of `[CLS]`) and `[ENC]`, like Salesforce/blip-image-captioning-*."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(_corpus(), trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    tok = BertTokenizer(vocab=wp.get_vocab(), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    _add_special(tok, ["[ENC]"])
    text = dict(vocab_size=len(tok), hidden_size=64, encoder_hidden_size=32, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, initializer_range=LM_INIT,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                sep_token_id=tok.sep_token_id)
    # The vision config defaults initializer_range to 1e-10: the features would barely depend on the image.
    vision = _vit()
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                              tokenizer=tok)
    return BlipForConditionalGeneration(config), processor


def _vision_encoder_decoder():
    """ViT encoder + GPT-2 decoder with cross-attention, like nlpconnect/vit-gpt2-image-captioning: a
    ViTImageProcessor and a GPT-2 tokenizer saved side by side (no processor class; no pad token)."""
    from transformers import (GPT2Config, GPT2Tokenizer, ViTConfig, ViTImageProcessor, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)

    vocab, merges = _train_byte_level(["<|endoftext|>"])
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    eos = tok.eos_token_id
    encoder = ViTConfig(**{**_vit(), "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4})
    decoder = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=128, add_cross_attention=True,
                         is_decoder=True, bos_token_id=eos, eos_token_id=eos, initializer_range=LM_INIT)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = eos
    image_processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return VisionEncoderDecoderModel(config), (image_processor, tok)


_BUILDERS = {"blip": _blip, "vision_encoder_decoder": _vision_encoder_decoder, "llava": _llava,
             "idefics3": _idefics3, "qwen2_vl": _qwen2_vl, "qwen2_5_vl": lambda: _qwen2_vl("qwen2_5_vl"),
             "paligemma": _paligemma}


def build_tiny_vlm(family: str, root: Path, seed: int = 0) -> Path:
    """Builds the tiny `family` model and processor and saves both in `root/family` (returned)."""
    import torch

    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}: one of {FAMILIES}")
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family]()
    model.eval()
    out = Path(root) / family
    model.save_pretrained(out)
    for part in processor if isinstance(processor, tuple) else (processor,):
        part.save_pretrained(out)
    return out


def tiny_vlm_dir(family: str, root: Path) -> Path:
    """`root/family`, built on first use (built aside then renamed, so a half-written directory never shows)."""
    out = Path(root) / family
    if not out.exists():
        tmp = build_tiny_vlm(family, Path(root) / f".building-{os.getpid()}")
        try:
            os.replace(tmp, out)
        except OSError:  # built meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(tmp.parent, ignore_errors=True)
    return out


def linear_names(model, family: str) -> dict[str, list[str]]:
    """Names of the nn.Linear layers (and GPT-2 Conv1D) in each part of PARTS[family] plus "head" (those in no part:
    lm_head), relative to the repeated block (`self_attn.q_proj` for `...layers.0.self_attn.q_proj`); the projector
    inside Qwen's vision tower is counted under "projector" only."""
    import torch

    parts = {k: v for k, v in PARTS[family].items() if v}
    modules = dict(model.named_modules())
    found: dict[str, set] = {k: set() for k in [*parts, "head"]}
    for name, module in modules.items():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        owner = max((k for k, p in parts.items() if name.startswith(p + ".")), key=lambda k: len(parts[k]),
                    default="head")
        comps = name[len(parts[owner]) + 1:].split(".") if owner != "head" else name.split(".")
        for i in range(len(comps) - 1, 0, -1):  # drop everything up to the last ModuleList index
            parent = ".".join(([parts[owner]] if owner != "head" else []) + comps[:i])
            if comps[i].isdigit() and isinstance(modules.get(parent), torch.nn.ModuleList):
                comps = comps[i + 1:]
                break
        found[owner].add(".".join(comps))
    return {k: sorted(v) for k, v in found.items()}
