"""transformers causal language models (Llama, Qwen2, Mistral, Gemma, GPT-2, Phi, ...) and their tokenizers.

A model is named by a hub id, a local `save_pretrained` directory, or a GGUF file (loaded through
transformers' `gguf_file=`, which dequantizes the weights). Everything goes through the Auto classes:
no family is chosen from a model name. Built-in chat templates (ChatML) stand in for tokenizers that
ship none.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from mmtune.errors import ConfigError, ModelError
from mmtune.quiet import quiet_gguf_bar
from mmtune.registry import Registry
from mmtune.specs import ModelSpec

log = logging.getLogger("mmtune")

CHAT_TEMPLATES: Registry[str] = Registry("chat template")

# ChatML with `{% generation %}` markers, so `return_assistant_tokens_mask` marks exactly the assistant
# replies and their end-of-turn token (the model must learn to stop).
CHAT_TEMPLATES.register("chatml")(
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

QUANTIZATIONS = ("none", "nf4", "int8")


@dataclass
class HFRef:
    """Where `from_pretrained` looks: a hub id or directory, plus a GGUF file name inside it."""

    path: str
    gguf_file: Optional[str] = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_hf_ref(spec: ModelSpec) -> HFRef:
    """A local directory, a `.gguf` file, or (anything else) a hub id."""
    path = Path(spec.name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model.name {spec.name!r} is a file but not a GGUF file; name a directory written by "
                             "`save_pretrained`, a .gguf file, or a hub id")
        return HFRef(str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return HFRef(str(path), ggufs[0].name)
            raise ModelError(f"model directory {path} has no config.json (expected `save_pretrained` output)"
                             + (f"; it holds several GGUF files, name one: {[g.name for g in ggufs]}" if ggufs else ""))
        return HFRef(str(path))
    if spec.name.lower().endswith(".gguf"):
        raise ModelError(f"GGUF file not found: {spec.name}")
    return HFRef(spec.name, spec.kwargs.get("gguf_file"))


_WARNED_REMOTE_CODE: set[str] = set()  # model names already warned about in this process


def remote_code(spec: ModelSpec) -> dict:
    """The `trust_remote_code` argument for every transformers `from_pretrained` of `spec`.

    Always explicit: transformers' default (None) asks on a terminal whether to run a model's code.
    On, it logs a warning (once per model and process: a load reads config, weights and tokenizer).
    """
    if spec.trust_remote_code and spec.name not in _WARNED_REMOTE_CODE:
        _WARNED_REMOTE_CODE.add(spec.name)
        log.warning(f"model.trust_remote_code is on: Python code shipped with {spec.name!r} (its folder or hub "
                    "repo) will run while it loads; use this only for code you trust")
    return {"trust_remote_code": spec.trust_remote_code}


@contextmanager
def refusing_custom_code(spec: ModelSpec) -> Iterator[None]:
    """Turns transformers' refusal to run a model's own code (trust_remote_code off) into a one-line
    ModelError that names the key to change."""
    try:
        yield
    except ValueError as err:
        if spec.trust_remote_code or "trust_remote_code" not in str(err):
            raise
        raise ModelError(f"{spec.name!r} needs the Python code shipped with it to load (an `auto_map` in its "
                         "config files names custom classes), and mmtune runs such code only with "
                         "model.trust_remote_code: true; set it only if you trust that code") from None


def save_pretrained_safetensors(model: nn.Module, out) -> None:
    """`model.save_pretrained(out)` writing safetensors only (no pickled `.bin`). transformers 4.x has a
    `safe_serialization` switch, made explicit here; 5.x has none and writes nothing else."""
    takes_switch = "safe_serialization" in inspect.signature(model.save_pretrained).parameters
    model.save_pretrained(out, **({"safe_serialization": True} if takes_switch else {}))


def _offline_error(name: str, err: Exception) -> ModelError:
    return ModelError(
        f"could not load {name!r} ({type(err).__name__}: {str(err)[:300]}). Without a network, point model.name "
        "at a local directory written by `save_pretrained` (or an `mmtune export` folder) or at a .gguf file."
    )


def _dtype(spec: ModelSpec):
    if spec.dtype in (None, "auto"):
        return spec.dtype or torch.float32
    value = getattr(torch, spec.dtype, None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"model.dtype {spec.dtype!r} is not a torch dtype (float32, bfloat16, float16, auto)")
    return value


def quantization_config(spec: ModelSpec):
    """bitsandbytes settings for QLoRA (`nf4`: 4-bit NormalFloat with double quantization) or 8-bit."""
    if spec.quantization not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization {spec.quantization!r}: use one of {QUANTIZATIONS}")
    if spec.quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"model.quantization: {spec.quantization} needs bitsandbytes (pip install bitsandbytes)") from None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = _dtype(spec) if spec.dtype not in (None, "auto") else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_causal_lm(spec: ModelSpec, quantize: bool = True) -> nn.Module:
    """Builds an `AutoModelForCausalLM` from `spec` (random weights with `pretrained: false`).

    Args:
        spec: the model reference; `kwargs` go to `from_pretrained` (e.g. `attn_implementation`).
        quantize: apply `spec.quantization` (export reloads the base unquantized to merge into).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = resolve_hf_ref(spec)
    kwargs = {k: v for k, v in spec.kwargs.items() if k != "gguf_file"}
    quant = quantization_config(spec) if quantize else None
    code = remote_code(spec)
    if ref.gguf_file:
        quiet_gguf_bar()  # transformers' de-quantisation bar, shown with --verbose only
    try:
        with refusing_custom_code(spec):
            if not spec.pretrained:
                config = AutoConfig.from_pretrained(ref.path, **ref.kwargs(), **code)
                return AutoModelForCausalLM.from_config(config, dtype=_dtype(spec), **code, **kwargs)
            if quant is not None:
                kwargs["quantization_config"] = quant
            return AutoModelForCausalLM.from_pretrained(ref.path, dtype=_dtype(spec), **ref.kwargs(), **code, **kwargs)
    except OSError as err:
        raise _offline_error(spec.name, err) from err


def load_tokenizer(spec: ModelSpec, chat_template: Optional[str] = None):
    """The model's tokenizer with a chat template and a padding token.

    Args:
        spec: the model reference.
        chat_template: None keeps the tokenizer's own template (ChatML when it has none); a name from
            `CHAT_TEMPLATES` replaces it.
    """
    from transformers import AutoTokenizer

    ref = resolve_hf_ref(spec)
    try:
        with refusing_custom_code(spec):
            tok = AutoTokenizer.from_pretrained(ref.path, **ref.kwargs(), **remote_code(spec))
    except OSError as err:
        raise _offline_error(spec.name, err) from err
    if chat_template is not None or not tok.chat_template:
        name = chat_template or "chatml"
        tok.chat_template = CHAT_TEMPLATES.get(name)
        if name == "chatml" and tok.convert_tokens_to_ids("<|im_end|>") in (None, tok.unk_token_id):
            log.warning("the tokenizer has no <|im_start|>/<|im_end|> tokens: ChatML markers are split into "
                        "ordinary tokens, and generation stops only at the EOS token")
    if tok.pad_token is None:
        # Padding is masked out of attention and loss, so any id works; EOS is always there.
        tok.pad_token = tok.eos_token
    return tok


def vocabulary_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id, special tokens included): two models
    whose per-token losses are compared must split text into the same tokens."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus the end-of-turn token of ChatML-style templates, for generation."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id and end not in ids:
        ids.append(end)
    return ids


def lm_parts(model: nn.Module) -> dict[str, Optional[list[str]]]:
    """The parts of a causal LM for `apply_adapter`: input embeddings, output head, the rest."""
    names = {id(m): n for n, m in model.named_modules()}
    embed = names.get(id(model.get_input_embeddings()))
    head = names.get(id(model.get_output_embeddings())) if model.get_output_embeddings() is not None else None
    parts: dict[str, Optional[list[str]]] = {"language": None}
    if embed:
        parts["embeddings"] = [embed]
    if head:
        parts["head"] = [head]
    return parts


def decoder_layers(model: nn.Module) -> list[str]:
    """Names of the repeated decoder blocks (the largest ModuleList), for FSDP2 units."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        return []
    name, blocks = max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))
    return [f"{name}.{i}" for i in range(len(blocks))]
