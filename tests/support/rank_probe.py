"""A callback for multi-process tests: each rank writes which rows it trained on and a digest of its
trainable weights at the end of the fit, so a test can check that ranks split the data and stayed in
step (DDP keeps every rank's weights equal)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class RankProbe(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.origins = Path(out_dir), []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.origins.extend(str(o) for o in batch["origins"])

    def on_fit_end(self, trainer, pl_module) -> None:
        trained = {n: p.detach().double() for n, p in pl_module.named_parameters() if p.requires_grad}
        digest = [float(sum(p.sum() * (i + 1) for i, p in enumerate(trained[n] for n in sorted(trained)))),
                  float(sum(p.abs().sum() for p in trained.values()))]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"origins": self.origins, "digest": digest, "steps": trainer.global_step}))
