"""Freeze policies and peft adapters for any model, from one `AdapterSpec`.

A task describes its model as named *parts* (classifier: backbone, head; later VLMs: vision,
projector, language, ...). Each part is frozen, gets an adapter, or trains fully. Adapters come from
peft; "full" parts stay ordinary trainable parameters (not peft's `modules_to_save` copies), so a
merge keeps them exactly as trained.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from mmtune.adapters.targets import DEFAULT_TARGETS
from mmtune.errors import ConfigError
from mmtune.specs import PROMPT_LEARNING, AdapterSpec, PartPolicy

log = logging.getLogger(__name__)

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


@dataclass
class AdapterReport:
    """What `apply_adapter` did, for the start-of-run log line and for tests."""

    method: str
    policies: dict[str, PartPolicy]
    adapted: list[str] = field(default_factory=list)
    trainable: int = 0
    total: int = 0

    def summary(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        parts = ", ".join(f"{k}={v}" for k, v in self.policies.items())
        adapted = f"; {self.method} on {len(self.adapted)} modules" if self.adapted else ""
        return f"trainable params: {self.trainable:,} / {self.total:,} ({pct:.2f}%); parts: {parts}{adapted}"


def _part_of(name: str, parts: dict[str, Optional[list[str]]]) -> str:
    rest = None
    for part, prefixes in parts.items():
        if prefixes is None:
            rest = part
        elif any(name == p or name.startswith(p + ".") for p in prefixes):
            return part
    if rest is None:
        raise ValueError(f"module {name!r} belongs to no part and no catch-all part is defined")
    return rest


def part_lookup(parts: dict[str, Optional[list[str]]]) -> Callable[[str], str]:
    """`name -> part` for parameter or module names, e.g. for per-part learning rates."""
    return lambda name: _part_of(name, parts)


def _adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    extra: tuple = ()
    try:
        from transformers.pytorch_utils import Conv1D

        extra = (Conv1D,)
    except ImportError:
        pass
    return {n: m for n, m in model.named_modules() if n and isinstance(m, ADAPTABLE + extra)}


def resolve_targets(
    model: nn.Module, spec: AdapterSpec, family: str, parts: dict[str, Optional[list[str]]], adapter_parts: set[str]
) -> list[str]:
    """Module names to adapt: the family's table (`auto`), names, or a regex; limited to adapter parts."""
    modules = _adaptable_modules(model)
    candidates = {n: m for n, m in modules.items() if _part_of(n, parts) in adapter_parts}
    if spec.targets == "auto":
        names = DEFAULT_TARGETS.get(family)(candidates)
    elif isinstance(spec.targets, str):
        pattern = re.compile(spec.targets)
        names = [n for n in candidates if pattern.fullmatch(n)]
    else:
        names = [n for n in candidates if any(n == t or n.endswith("." + t) for t in spec.targets)]
    if spec.exclude:
        drop = re.compile(spec.exclude)
        names = [n for n in names if not drop.search(n)]
    if not names:
        sample = ", ".join(list(candidates)[:8])
        raise ConfigError(
            f"adapter targets {spec.targets!r} (exclude={spec.exclude!r}) match no layer in parts "
            f"{sorted(adapter_parts)}. Adaptable layers there include: {sample or 'none'}"
        )
    return names


LAYER_METHODS = ("lora", "dora", "ia3", "loha", "lokr", "vera")


def _lora_init(spec: AdapterSpec) -> dict:
    if spec.init == "default":
        return {}
    if spec.init == "loftq":
        import peft

        xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
        if not (torch.cuda.is_available() or xpu):
            # peft 0.21 quantizes with bitsandbytes on a CUDA (or XPU) device during LoftQ's initialization
            raise ConfigError("adapter.init 'loftq' needs a CUDA or XPU GPU: peft computes LoftQ's start there; "
                              "on CPU use init: pissa (also a principal-subspace start) or default")
        return dict(init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=spec.loftq_bits))
    return dict(init_lora_weights=spec.init)


def _peft_config(spec: AdapterSpec, targets: list[str]):
    import peft

    common = dict(target_modules=targets)
    if spec.method in ("lora", "dora"):
        return peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                               use_dora=spec.method == "dora", use_rslora=spec.rslora, **_lora_init(spec), **common)
    if spec.method == "ia3":
        # No layer is treated as feed-forward: IA3 then scales every target's output, which is
        # defined for any architecture (peft otherwise needs a per-model feed-forward list).
        return peft.IA3Config(feedforward_modules=[], **common)
    if spec.method == "loha":
        return peft.LoHaConfig(r=spec.r, alpha=spec.alpha, module_dropout=spec.dropout, **common)
    if spec.method == "lokr":
        return peft.LoKrConfig(r=spec.r, alpha=spec.alpha, module_dropout=spec.dropout, **common)
    if spec.method == "vera":
        # The shared random projections are saved with the adapter, so a checkpoint never depends on
        # re-drawing them from the seed.
        return peft.VeraConfig(r=spec.r, vera_dropout=spec.dropout, save_projection=True, **common)
    raise ConfigError(f"unknown adapter method {spec.method!r}")


def _prompt_learning_config(spec: AdapterSpec, task_type: str):
    import peft

    if spec.method == "prefix":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=spec.num_virtual_tokens)
    return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=spec.num_virtual_tokens)


def _check_method_applies(model: nn.Module, spec: AdapterSpec, targets: list[str], prompt_learning: Optional[str]) -> None:
    """A method that cannot apply to this model is an error naming the methods that can."""
    can = ["none", *LAYER_METHODS] + (list(PROMPT_LEARNING) if prompt_learning else [])
    if spec.method in PROMPT_LEARNING and not prompt_learning:
        raise ConfigError(f"adapter.method {spec.method!r} (virtual tokens for a language model) does not apply to "
                          f"this model ({type(model).__name__}); methods that do: {', '.join(can)}")
    if spec.method == "vera":
        others = [n for n in targets if not isinstance(model.get_submodule(n), nn.Linear)]
        if others:
            raise ConfigError(f"adapter.method 'vera' adapts linear layers only; {len(others)} target(s) are not "
                              f"(e.g. {others[0]}: {type(model.get_submodule(others[0])).__name__}); set "
                              f"adapter.targets to linear layers or use one of: {', '.join(m for m in can if m != 'vera')}")


def apply_adapter(
    model: nn.Module,
    spec: AdapterSpec,
    family: str,
    parts: dict[str, Optional[list[str]]],
    default_policies: dict[str, PartPolicy],
    layer_ids: Optional[Callable[[nn.Module], dict[str, int]]] = None,
    prompt_learning: Optional[str] = None,
) -> tuple[nn.Module, AdapterReport]:
    """Freezes, adapts and unfreezes the parts of `model` as `spec` says.

    Args:
        model: the network, as built by its family's factory.
        spec: the user's adapter spec.
        family: key of the default target table (`timm`, `torchvision`, `hf`, ...).
        parts: part name -> module-path prefixes; exactly one part may be `None`, the catch-all.
        default_policies: each part's policy when `spec.parts` does not name it; a part whose
            default is `adapter` trains fully when `spec.method` is `none`.
        layer_ids: parameter name -> block index (head last), needed for `train_last_n_blocks`.
        prompt_learning: the peft task type (`CAUSAL_LM`) when prefix and prompt tuning apply to this
            model (transformers language models); None refuses them.

    Returns:
        The model (a `peft.PeftModel` when an adapter method is set) and a report.
    """
    unknown = sorted(set(spec.parts) - set(parts))
    if unknown:
        raise ConfigError(f"adapter.parts names unknown part(s) {unknown}; this model has parts {sorted(parts)}")
    policies: dict[str, PartPolicy] = {}
    for part in parts:
        policy = spec.parts.get(part, default_policies.get(part, "full"))
        if policy == "adapter" and spec.method == "none":
            if part in spec.parts:
                raise ConfigError(f"adapter.parts.{part} is 'adapter' but adapter.method is 'none'")
            policy = "full"
        policies[part] = policy
    adapter_parts = {p for p, pol in policies.items() if pol == "adapter"}

    adapted: list[str] = []
    if spec.method != "none":
        if not adapter_parts:
            raise ConfigError(f"adapter.method is {spec.method!r} but no part uses it: {policies}")
        import peft

        if spec.method in PROMPT_LEARNING:
            _check_method_applies(model, spec, [], prompt_learning)
            # Virtual tokens live outside the base model (peft's prompt encoder): no layer is adapted,
            # and the base's own parameters follow the part policies below.
            model = peft.get_peft_model(model, _prompt_learning_config(spec, prompt_learning))
            adapted = [f"{spec.num_virtual_tokens} virtual tokens"]
        else:
            adapted = resolve_targets(model, spec, family, parts, adapter_parts)
            _check_method_applies(model, spec, adapted, prompt_learning)
            model = peft.get_peft_model(model, _peft_config(spec, adapted))
    raw = model.get_base_model() if spec.method != "none" else model
    # Right after peft's injection exactly the adapter tensors are trainable.
    adapter_params = ({n for n, p in raw.named_parameters() if p.requires_grad}
                      if adapted and spec.method not in PROMPT_LEARNING else set())

    for name, param in raw.named_parameters():
        if name in adapter_params:
            continue
        param.requires_grad_(policies[_part_of(name, parts)] == "full")
    if spec.train_last_n_blocks:
        if layer_ids is None:
            raise ConfigError("adapter.train_last_n_blocks is not supported for this model")
        ids = layer_ids(raw)
        head_id = max(ids.values())
        first = head_id - spec.train_last_n_blocks
        for name, param in raw.named_parameters():
            if name not in adapter_params and first <= ids.get(name, -1) < head_id:
                param.requires_grad_(True)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise ConfigError(f"nothing would train: every part is frozen ({policies})")
    return model, AdapterReport(spec.method, policies, adapted, trainable, total)


def trainable_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `state` (from `module.state_dict()`) that training changes: trainable
    parameters and persistent buffers (e.g. BatchNorm running statistics)."""
    keep = {n for n, p in module.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in module.named_buffers()}
    return {k: v for k, v in state.items() if k in keep}


def optimizer_parameters(net: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs for the optimizer, named as in the base model (so part rules apply),
    plus prefix/prompt tuning's virtual tokens, which peft keeps outside the base model
    (`prompt_encoder.*`, the catch-all part)."""
    import peft

    if not isinstance(net, peft.PeftModel):
        return list(net.named_parameters())
    params = list(net.get_base_model().named_parameters())
    if net.active_peft_config.is_prompt_learning:
        params += [(f"prompt_encoder.{n}", p) for n, p in net.prompt_encoder.named_parameters()]
    return params


def lora_plus_scale(spec: AdapterSpec) -> Optional[Callable[[str], float]]:
    """LoRA+ (Hayou et al. 2024): parameter name -> learning-rate multiplier, `lora_plus_ratio` for LoRA's
    B matrices and 1 otherwise; None without LoRA+.

    It mirrors peft's `create_loraplus_optimizer` rule for B rather than calling it: that function builds
    its own optimizer with its own groups, which would drop mmtune's per-part rates, layer-wise decay and
    no-decay rules (and it also gives every 1-D tensor the B rate, e.g. a fully trained part's norms).
    """
    if spec.lora_plus_ratio is None:
        return None
    ratio = float(spec.lora_plus_ratio)
    return lambda name: ratio if (".lora_B." in name or ".lora_embedding_B." in name) else 1.0


def merge_adapter(model: nn.Module) -> nn.Module:
    """Folds peft adapters into the base weights and returns the plain model."""
    import peft

    if isinstance(model, peft.PeftModel):
        return model.merge_and_unload()
    return model
