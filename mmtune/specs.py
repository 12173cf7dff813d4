"""Typed specs shared by every task: model reference, adapter, optimizer, checkpoint monitor.

Tasks take these as `__init__` arguments, so LightningCLI/jsonargparse maps YAML onto them, type-checks
them and prints them with `--print_config`. Components receive the specs (plain values), never the
YAML. Checkpoints store them as plain dicts (`spec_to_dict`) so they load without unpickling classes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, TypeVar, Union

from mmtune.errors import ConfigError

PartPolicy = Literal["frozen", "adapter", "full"]


@dataclass
class ModelSpec:
    """Where a model comes from.

    Args:
        name: a timm name (`timm:convnext_tiny` or plain `convnext_tiny`), a torchvision name
            (`tv:resnet50`), a hub id (`hf-hub:timm/vit_base_patch16_224.augreg_in21k` for timm; HF
            ids for the transformers-based tasks), or a local directory written by `save_pretrained`,
            timm's `save_for_hf` or `mmtune export`.
        pretrained: load pretrained weights through the family's own factory. Needs the network for
            hub names; offline, point `name` at a local directory or set `checkpoint`.
        checkpoint: a local weights file (.safetensors, .pth, .bin, .pt) for the architecture in `name`.
        kwargs: extra arguments for the factory (timm: `img_size`, `in_chans`, `drop_path_rate`;
            transformers: `attn_implementation`, `gguf_file`, ...).
        dtype: weight dtype for transformers models (`float32`, `bfloat16`, `float16`, `auto`); None
            keeps float32. Image classifiers ignore it (use the Trainer's `precision`).
        quantization: load a transformers model quantized by bitsandbytes for QLoRA-style training:
            `nf4` (4-bit NormalFloat, double quantization) or `int8`; `none` keeps full weights.
        trust_remote_code: let transformers run the Python code a model folder or hub repo ships
            (models whose `config.json` has an `auto_map`). Off, such a model is refused with an error;
            on, mmtune logs a warning at each load. Only for models whose code you trust.
    """

    name: str
    pretrained: bool = True
    checkpoint: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: Optional[str] = None
    quantization: Literal["none", "nf4", "int8"] = "none"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        # `kwargs` go straight to the factories, so they could reopen what the keys above close.
        for key, why in UNSAFE_MODEL_KWARGS.items():
            if key in self.kwargs:
                raise ConfigError(f"model.kwargs.{key} is not accepted: {why}")


UNSAFE_MODEL_KWARGS = {
    "trust_remote_code": "set model.trust_remote_code instead (it logs that code from the model will run)",
    "weights_only": "mmtune always loads weight files with weights_only=True",
}


LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq")
PROMPT_LEARNING = ("prefix", "prompt")  # peft's prompt-learning methods: virtual tokens, no target layers


@dataclass
class AdapterSpec:
    """Which weights train, and how (applied by `mmtune.adapters.apply_adapter` on top of peft).

    Args:
        method: `none` (no adapter), or a peft method: `lora`, `dora`, `ia3`, `loha`, `lokr`, `vera`
            (layer adapters, merged into the weights at export), `prefix` (prefix tuning: trained key/value
            prefixes in every attention layer) or `prompt` (prompt tuning: trained input embeddings);
            prefix and prompt apply to causal LMs and the language model of VLMs and export as adapters.
        r: adapter rank (LoRA/DoRA/LoHa/LoKr; VeRA's shared projections, which want a larger r, e.g. 256).
        alpha: LoRA scaling numerator (effective scale alpha/r, or alpha/sqrt(r) with `rslora`).
        dropout: dropout on the adapter input.
        targets: `auto` (the model family's default table), a list of module names (a name matches
            a module whose dotted path ends with it), or one regex matched against full module paths.
        exclude: regex of module paths never adapted, applied after `targets`.
        parts: policy for each named part of the model: `frozen`, `adapter` or `full` (trained
            entirely). Classifiers have parts `backbone` and `head`; a part not named gets the default
            (`adapter` for the backbone when a method is set, else `full`; the head is always `full`).
            Linear probe: `method: none, parts: {backbone: frozen}`.
        train_last_n_blocks: also train the last N blocks of the backbone entirely (0: none).
        rslora: rank-stabilized LoRA scaling.
        init: LoRA's initialization (peft's `init_lora_weights`): `default` (A random, B zero),
            `gaussian`, `pissa` (A, B from the principal singular vectors; the base keeps the rest),
            `olora` (from a QR decomposition) or `loftq` (a quantization-aware start, `loftq_bits`).
            pissa, olora and loftq rewrite the base weights so the model's outputs stay the same at step 0.
        loftq_bits: bits of LoftQ's quantization (4: nf4, 8: int8); LoftQ needs a CUDA or XPU GPU.
        lora_plus_ratio: LoRA+: the B matrices learn at this multiple of their group's rate (e.g. 16).
        num_virtual_tokens: virtual tokens of prefix and prompt tuning.
    """

    method: Literal["none", "lora", "dora", "ia3", "loha", "lokr", "vera", "prefix", "prompt"] = "none"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Union[str, list[str]] = "auto"
    exclude: Optional[str] = None
    parts: dict[str, PartPolicy] = field(default_factory=dict)
    train_last_n_blocks: int = 0
    rslora: bool = False
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    loftq_bits: int = 4
    lora_plus_ratio: Optional[float] = None
    num_virtual_tokens: int = 20

    def __post_init__(self) -> None:
        if self.init != "default" and self.method not in ("lora", "dora"):
            raise ConfigError(f"adapter.init {self.init!r} is a LoRA initialization; adapter.method is {self.method!r}")
        if self.init in ("pissa", "olora", "loftq") and self.method != "lora":
            raise ConfigError(f"adapter.init {self.init!r} needs adapter.method: lora (got {self.method!r})")
        if self.lora_plus_ratio is not None:
            if self.method not in ("lora", "dora"):
                raise ConfigError(f"adapter.lora_plus_ratio needs adapter.method lora or dora (got {self.method!r})")
            if self.lora_plus_ratio <= 0:
                raise ConfigError(f"adapter.lora_plus_ratio must be positive, got {self.lora_plus_ratio}")
        if self.loftq_bits not in (4, 8):
            raise ConfigError(f"adapter.loftq_bits must be 4 or 8 (peft's LoftQ quantizes to nf4 or int8), got {self.loftq_bits}")
        if self.method in PROMPT_LEARNING and self.num_virtual_tokens < 1:
            raise ConfigError(f"adapter.num_virtual_tokens must be at least 1, got {self.num_virtual_tokens}")

    @property
    def mergeable(self) -> bool:
        """Whether the adapter folds into the base weights (prefix and prompt tuning add inputs instead)."""
        return self.method not in PROMPT_LEARNING

    @property
    def rewrites_base(self) -> bool:
        """Whether the adapter's initialization changes the base weights (PiSSA, OLoRA, LoftQ): the base
        with adapters switched off is then no longer the starting model."""
        return self.init in ("pissa", "olora", "loftq")


@dataclass
class OptimizerSpec:
    """AdamW with decoupled weight decay (none on norms, biases and other 1-D tensors) and a schedule.

    Args:
        lr: peak learning rate.
        weight_decay: decay for weight matrices and kernels.
        betas: AdamW betas.
        eps: AdamW epsilon.
        schedule: decay after warmup: `cosine`, `linear` or `constant`.
        warmup: warmup length: a fraction of all steps when below 1, else a number of steps.
        min_lr_ratio: the schedule ends at `lr * min_lr_ratio`.
        layer_decay: layer-wise lr decay for ViTs and other block-structured models (e.g. 0.75):
            block i of n gets `lr * layer_decay ** (n - i)`; the head keeps `lr`.
        part_lrs: learning rates for named parts that override `lr` (e.g. `{head: 1e-2}`;
            vision-language tasks add `vision`, `projector`, `language`).
        vision_lr: shorthand for `part_lrs: {vision: ...}` (vision-language and alignment tasks).
        projector_lr: shorthand for `part_lrs: {projector: ...}` (vision-language tasks).
        fused: fused AdamW kernel (one kernel for all parameters; same update). None: on when every
            parameter is on a GPU.
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = 0.05
    min_lr_ratio: float = 0.0
    layer_decay: Optional[float] = None
    part_lrs: dict[str, float] = field(default_factory=dict)
    vision_lr: Optional[float] = None
    projector_lr: Optional[float] = None
    fused: Optional[bool] = None

    def all_part_lrs(self) -> dict[str, float]:
        """`part_lrs` with the `vision_lr`/`projector_lr` shorthands folded in."""
        out = dict(self.part_lrs)
        for part, value in (("vision", self.vision_lr), ("projector", self.projector_lr)):
            if value is not None:
                if part in out and out[part] != value:
                    raise ConfigError(f"optimizer.{part}_lr ({value}) contradicts optimizer.part_lrs.{part} ({out[part]})")
                out[part] = value
        return out


@dataclass
class MonitorSpec:
    """Early stopping and best-checkpoint keeping, on by default.

    Args:
        metric: the logged metric to watch (e.g. `val/loss`, `val/f1_macro`, `val/auroc_macro`).
        mode: `min` or `max`.
        early_stopping: stop when `metric` has not improved for `patience` validations.
        patience: validations without improvement before stopping.
        save_best: keep the best checkpoint as `checkpoints/best.ckpt` in the run directory.
        save_last: keep `checkpoints/last.ckpt` to resume a killed run with `--ckpt_path last`.
        save_last_every_n_steps: also rewrite `last.ckpt` every this many optimizer steps inside an
            epoch (0: only at validations), so a run killed without warning (OOM killer, SIGKILL, a
            lost node) loses at most this many steps; the resume continues mid-epoch exactly.
    """

    metric: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    early_stopping: bool = True
    patience: int = 5
    save_best: bool = True
    save_last: bool = True
    save_last_every_n_steps: int = 0

    def __post_init__(self) -> None:
        if self.save_last_every_n_steps < 0:
            raise ConfigError(f"monitor.save_last_every_n_steps must be 0 or more, got {self.save_last_every_n_steps}")


S = TypeVar("S")


def as_spec(cls: type[S], value: Union[S, dict, None]) -> S:
    """Returns `value` as a `cls` instance: accepts an instance, a dict (from a checkpoint) or None."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} for {cls.__name__}; known: {sorted(known)}")
        data = dict(value)
        for f in dataclasses.fields(cls):
            if f.name in data and isinstance(data[f.name], list) and f.type.startswith("tuple"):
                data[f.name] = tuple(data[f.name])
        return cls(**data)
    raise ConfigError(f"expected {cls.__name__} or a mapping, got {type(value).__name__}")


def spec_to_dict(spec: Any) -> dict:
    """Plain-dict form of a spec (tuples as lists) for hyperparameters, hparams.yaml and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(spec))
