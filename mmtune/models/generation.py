"""The state a model generates in: eval mode, key/value cache on, activation checkpointing off, no
gradients; the training state restored afterwards.

Training turns caches off (`config.use_cache = False`, they would only hold memory) and may wrap
every block in activation checkpointing. A `generate` call inside validation inherits both unless
they are switched: without the cache each new token reruns the whole sequence (quadratic), and
checkpointed blocks add their wrapper work to every call.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _configs(net: nn.Module) -> list:
    found, seen = [], set()
    for module in net.modules():
        for cfg in (getattr(module, "config", None), getattr(module, "generation_config", None)):
            if cfg is None or id(cfg) in seen or not hasattr(cfg, "use_cache"):
                continue
            seen.add(id(cfg))
            found.append(cfg)
            for key in ("text_config", "decoder"):
                sub = getattr(cfg, key, None)
                if sub is not None and hasattr(sub, "use_cache") and id(sub) not in seen:
                    seen.add(id(sub))
                    found.append(sub)
    return found


@contextmanager
def generation_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Within the block `net` is in eval mode with caches on, checkpointing off and gradients off."""
    was_training = net.training
    checkpointed = [m for m in net.modules() if getattr(m, "gradient_checkpointing", False) is True]
    caches = [(cfg, cfg.use_cache) for cfg in _configs(net)]
    for module in checkpointed:
        module.gradient_checkpointing = False
    for cfg, _ in caches:
        cfg.use_cache = True
    net.eval()
    try:
        with torch.no_grad():
            yield net
    finally:
        net.train(was_training)
        for module in checkpointed:
            module.gradient_checkpointing = True
        for cfg, value in caches:
            cfg.use_cache = value
