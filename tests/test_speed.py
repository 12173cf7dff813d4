"""Speed switches: generation in eval mode with the KV cache and no checkpointing (state restored)."""

from __future__ import annotations

import pytest
import torch

from support.text import build_model
from mmtune.models.generation import generation_mode
from mmtune.specs import AdapterSpec, ModelSpec
from mmtune.tasks.sft import CausalLMTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_generation_mode_turns_on_the_cache_and_off_checkpointing_then_restores(tmp_path):
    task = CausalLMTask(ModelSpec(name=str(build_model("llama", tmp_path))), AdapterSpec(method="lora"),
                        gradient_checkpointing=True)
    task.configure_model()
    raw = task._raw()
    layers = [m for m in task.net.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert layers and task.net.training and raw.config.use_cache is False
    seen = {}

    def spy(module, args, kwargs):
        seen.update(training=module.training, grad=torch.is_grad_enabled(), cache=kwargs.get("use_cache"),
                    checkpointing=any(m.gradient_checkpointing for m in layers))

    handle = raw.model.register_forward_pre_hook(spy, with_kwargs=True)
    with generation_mode(task.net):
        assert raw.config.use_cache is True
        task.net.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    handle.remove()
    assert seen == {"training": False, "grad": False, "cache": True, "checkpointing": False}
    assert task.net.training and raw.config.use_cache is False and all(m.gradient_checkpointing for m in layers)


def test_default_cnn_targets_skip_the_stem_and_narrow_convs():
    import timm
    from torch import nn

    from mmtune.adapters.targets import CNN_MIN_CHANNELS, vision_backbone_targets

    with torch.device("meta"):
        lite = timm.create_model("tf_efficientnet_lite0", num_classes=4)
    convs = {n: m for n, m in lite.named_modules() if isinstance(m, nn.Conv2d)}
    chosen = vision_backbone_targets(convs)
    assert "conv_stem" not in chosen and "conv_head" in chosen
    assert all(convs[n].groups == 1 and min(convs[n].in_channels, convs[n].out_channels) >= CNN_MIN_CHANNELS
               for n in chosen)
    # every wide pointwise conv of the later stages is still adapted
    assert {n for n, m in convs.items() if m.groups == 1 and m.in_channels > 4
            and min(m.in_channels, m.out_channels) >= CNN_MIN_CHANNELS} == set(chosen) and len(chosen) >= 20
