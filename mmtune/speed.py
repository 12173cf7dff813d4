"""Training switches for speed and memory that every task takes, as one Lightning callback: no task
branches on them. Add it to the trainer's callbacks in a config:

    trainer:
      callbacks:
        - class_path: mmtune.speed.TrainingSwitches
          init_args: {compile: true, channels_last: true, activation_checkpointing: true}

Each switch is the library's own mechanism applied to the task's network (`pl_module.net`):
`torch.compile` in place (`nn.Module.compile`, so names, state dict and checkpoints are unchanged),
`torch.channels_last` for the 4-D weights of CNNs, timm's `set_grad_checkpointing` per block (and
transformers' `gradient_checkpointing_enable` for HF models), and torch's `save_on_cpu` hooks for
activation offloading. Fused AdamW is `optimizer.fused`; bf16 weights with float32 adapters are
`model.dtype: bfloat16` (peft keeps adapter weights in float32) with `trainer.precision: bf16-mixed`.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from mmtune.errors import ConfigError


def _base(net: nn.Module) -> nn.Module:
    return net.get_base_model() if hasattr(net, "get_base_model") else net


def enable_activation_checkpointing(net: nn.Module) -> str:
    """Recompute each block's activations in the backward pass; returns how (for the log)."""
    raw = _base(net)
    if hasattr(raw, "set_grad_checkpointing"):  # timm models
        raw.set_grad_checkpointing(True)
        return "timm set_grad_checkpointing"
    if getattr(raw, "supports_gradient_checkpointing", False):  # transformers models
        raw.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if raw is not net and hasattr(raw, "enable_input_require_grads"):
            raw.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
        return "transformers gradient_checkpointing_enable"
    inner = [m for m in raw.modules() if m is not raw and hasattr(m, "set_grad_checkpointing")]
    if inner:  # e.g. a dual encoder holding a timm tower
        for m in inner:
            m.set_grad_checkpointing(True)
        return f"timm set_grad_checkpointing on {len(inner)} tower(s)"
    raise ConfigError(f"activation_checkpointing: {type(raw).__name__} supports neither timm's "
                      "set_grad_checkpointing nor transformers' gradient_checkpointing_enable")


class TrainingSwitches(Callback):
    """Speed and memory switches applied to the task's network when fitting starts.

    Args:
        compile: `torch.compile` the network (in place; the first steps are slower while it compiles).
        compile_mode: torch.compile mode (`default`, `reduce-overhead`, `max-autotune`).
        compile_backend: torch.compile backend (`inductor`; `aot_eager` compiles without a C++ compiler).
        channels_last: channels-last memory format for CNN weights (faster convs on GPUs and CPUs).
        activation_checkpointing: recompute activations per block in the backward (timm backbones,
            transformers models): less memory, about 30% more compute.
        offload_activations: keep the activations saved for the backward in CPU memory (pinned) during
            each training step (torch's `save_on_cpu`): for long sequences on a GPU short of memory.
    """

    def __init__(self, compile: bool = False, compile_mode: Optional[str] = None, compile_backend: str = "inductor",
                 channels_last: bool = False, activation_checkpointing: bool = False,
                 offload_activations: bool = False) -> None:
        self.compile, self.compile_mode, self.compile_backend = compile, compile_mode, compile_backend
        self.channels_last = channels_last
        self.activation_checkpointing = activation_checkpointing
        self.offload_activations = offload_activations
        self._offload: Optional[Any] = None
        self._applied_to: Optional[int] = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        net = getattr(pl_module, "net", None)
        if net is None:
            raise ConfigError(f"TrainingSwitches: {type(pl_module).__name__} has no network `net` to switch")
        if self._applied_to == id(net):
            return
        self._applied_to = id(net)
        done = []
        if self.activation_checkpointing:
            done.append(f"activation checkpointing ({enable_activation_checkpointing(net)})")
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
            done.append("channels-last")
        if self.compile:
            kwargs = {"backend": self.compile_backend, **({"mode": self.compile_mode} if self.compile_mode else {})}
            net.compile(**kwargs)
            body = getattr(_base(net), "model", None)  # the chunked LM loss calls the decoder body directly
            if isinstance(body, nn.Module) and hasattr(pl_module, "loss_sums"):
                body.compile(**kwargs)
            done.append(f"torch.compile ({self.compile_backend}{', ' + self.compile_mode if self.compile_mode else ''})")
        if self.offload_activations:
            done.append("activation offloading to CPU")
        if done:
            rank_zero_info(f"[mmtune] training switches: {', '.join(done)}")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.offload_activations:
            self._offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
            self._offload.__enter__()

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._close_offload()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._close_offload()

    def _close_offload(self) -> None:
        if self._offload is not None:
            self._offload.__exit__(None, None, None)
            self._offload = None
