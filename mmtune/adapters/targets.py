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


# Narrowest conv (min of in/out channels) that gets a default LoRA adapter. peft's conv LoRA runs two
# extra convs per adapted conv (in -> r, r -> out) plus a scale and an add over the output map: for a
# 1x1 conv that is r * (in + out) extra multiply-adds per pixel against in * out, i.e. +50% to +100% at
# 16-24 channels and r = 8, on the largest feature maps of the network. And an adapter on the stem (the
# conv that reads the image) makes autograd carry gradients back through every layer to the input
# resolution. On EfficientNet-Lite0 the old default (every non-grouped conv) made a LoRA step slower
# than a full fine-tuning step; skipping the stem and convs narrower than this made it faster
# (`tools/bench_overhead.py`, docs/benchmarks.md). ResNets keep all convs but the stem (64+ channels).
CNN_MIN_CHANNELS = 32


def _convs(candidates: dict[str, nn.Module]) -> list[str]:
    # Depthwise/grouped convs are skipped: they hold few weights and peft's conv LoRA assumes groups=1.
    convs = {n: m for n, m in candidates.items() if isinstance(m, nn.Conv2d) and m.groups == 1}
    cheap = [n for n, m in convs.items() if m.in_channels > 4 and min(m.in_channels, m.out_channels) >= CNN_MIN_CHANNELS]
    return cheap or list(convs)  # a tiny CNN with no wide conv keeps every conv


def _linears(candidates: dict[str, nn.Module]) -> list[str]:
    return [n for n, m in candidates.items() if isinstance(m, nn.Linear)]


@DEFAULT_TARGETS.register("timm")
@DEFAULT_TARGETS.register("torchvision")
def vision_backbone_targets(candidates: dict[str, nn.Module]) -> list[str]:
    """Transformers (ViT, Swin, ConvNeXt MLPs): every linear in the blocks, i.e. attention qkv/proj
    and MLP fc1/fc2. Pure CNNs (ResNet, EfficientNet): every non-grouped Conv2d but the stem and those
    narrower than `CNN_MIN_CHANNELS` (see there)."""
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
