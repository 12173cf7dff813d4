"""Default adapter targets for each model family (the role of peft's `constants.py` table).

Each entry takes the candidate modules (name -> module, already limited to the parts that get an
adapter) and returns the names to adapt. Later task families register their own entries.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from mmtune.registry import Registry

TargetRule = Callable[[dict[str, nn.Module]], list[str]]
DEFAULT_TARGETS: Registry[TargetRule] = Registry("adapter target table")


def _convs(candidates: dict[str, nn.Module]) -> list[str]:
    # Depthwise/grouped convs are skipped: they hold few weights and peft's conv LoRA assumes groups=1.
    return [n for n, m in candidates.items() if isinstance(m, nn.Conv2d) and m.groups == 1]


def _linears(candidates: dict[str, nn.Module]) -> list[str]:
    return [n for n, m in candidates.items() if isinstance(m, nn.Linear)]


@DEFAULT_TARGETS.register("timm")
@DEFAULT_TARGETS.register("torchvision")
def vision_backbone_targets(candidates: dict[str, nn.Module]) -> list[str]:
    """Transformers (ViT, Swin, ConvNeXt MLPs): every linear in the blocks, i.e. attention qkv/proj
    and MLP fc1/fc2. Pure CNNs (ResNet, EfficientNet): every non-grouped Conv2d."""
    return _linears(candidates) or _convs(candidates)


@DEFAULT_TARGETS.register("hf")
def hf_all_linear(candidates: dict[str, nn.Module]) -> list[str]:
    """transformers models: attention and MLP projections, i.e. all linear layers of the parts that
    get an adapter (the output head is a separate part, as in peft's `all-linear`)."""
    names = _linears(candidates)
    try:  # GPT-2 style Conv1D projections
        from transformers.pytorch_utils import Conv1D

        names += [n for n, m in candidates.items() if isinstance(m, Conv1D)]
    except ImportError:
        pass
    return names
