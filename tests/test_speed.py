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


def _fit_losses(tmp_path, model_dir, data, callbacks=(), steps=3, **task_kwargs):
    import lightning as L

    from mmtune import ImageClassificationData, ImageClassificationTask, ModelSpec, MonitorSpec

    class Losses(L.Callback):
        values: list = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.values.append(float(outputs["loss"]))

    L.seed_everything(0, verbose=False)
    losses = Losses()
    losses.values = []
    task = ImageClassificationTask(model=ModelSpec(name=str(model_dir)),
                                   monitor=MonitorSpec(early_stopping=False, save_best=False, save_last=False),
                                   **task_kwargs)
    dm = ImageClassificationData(path=str(data), batch_size=8, num_workers=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[losses, *callbacks])
    trainer.fit(task, dm)
    return losses.values, task


def test_compiled_and_eager_training_give_the_same_losses(tmp_path, tiny_models, color_set):
    from mmtune.speed import TrainingSwitches

    eager, _ = _fit_losses(tmp_path / "eager", tiny_models["vit"], color_set)
    compiled, task = _fit_losses(tmp_path / "compiled", tiny_models["vit"], color_set,
                                 [TrainingSwitches(compile=True, compile_backend="aot_eager")])
    assert getattr(task.net, "_compiled_call_impl", None) is not None  # compiled in place
    assert len(eager) == len(compiled) == 3
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)


def test_channels_last_and_activation_checkpointing_keep_the_first_step(tmp_path, tiny_models, color_set):
    from mmtune.speed import TrainingSwitches

    plain, _ = _fit_losses(tmp_path / "plain", tiny_models["cnn"], color_set, steps=2)
    switched, task = _fit_losses(tmp_path / "switched", tiny_models["cnn"], color_set, steps=2,
                                 callbacks=[TrainingSwitches(channels_last=True, activation_checkpointing=True)])
    weights = [p for p in task.net.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    from mmtune.speed import _base

    assert _base(task.net).grad_checkpointing is True  # timm's per-block checkpointing
    # the first step is the same; after one AdamW update (which divides tiny gradients by their own
    # scale) conv summation order differences show at 1e-4
    torch.testing.assert_close(switched[0], plain[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(switched[1], plain[1], rtol=1e-3, atol=1e-4)


def test_fused_adamw_makes_the_same_first_step():
    from mmtune.optim import build_optimizer
    from mmtune.specs import OptimizerSpec

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    updated = {}
    for fused in (False, True):
        net = torch.nn.Linear(16, 8)
        net.load_state_dict(base.state_dict())
        opt = build_optimizer([{"params": list(net.parameters()), "weight_decay": 0.01}],
                              OptimizerSpec(lr=1e-2, fused=fused))
        assert opt.defaults["fused"] is fused
        net(torch.ones(4, 16)).pow(2).sum().backward()
        opt.step()
        updated[fused] = [p.detach().clone() for p in net.parameters()]
    for a, b in zip(updated[True], updated[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(updated[True][0], base.weight)
