"""The `continual:` section as dataclasses (components receive these, never the YAML)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from mmtune.errors import ConfigError


@dataclass
class ReplaySpec:
    """Earlier training samples mixed into each later stage's training rows.

    Args:
        count: this many earlier samples per stage (0: use `share`).
        share: this share of all earlier training samples.
        seed: seed of the draw (the same seed always picks the same rows).
    """

    count: int = 0
    share: float = 0.0
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return self.count > 0 or self.share > 0


@dataclass
class DistillSpec:
    """Learning without Forgetting: KL between the previous stage's and the current model's softened
    outputs on the old classes, on every training batch.

    Args:
        weight: weight of the distillation term (0: off).
        temperature: softening temperature.
    """

    weight: float = 0.0
    temperature: float = 2.0


@dataclass
class StageSpec:
    """One stage: its data (a CSV manifest, split train/val/test by the data module's rule) and name."""

    path: str
    name: Optional[str] = None


@dataclass
class ContinualSpec:
    stages: list[StageSpec] = field(default_factory=list)
    epochs: int = 0  # epochs per stage (0: the task YAML's trainer.max_epochs)
    replay: ReplaySpec = field(default_factory=ReplaySpec)
    distill: DistillSpec = field(default_factory=DistillSpec)


def continual_spec(raw: Optional[dict]) -> ContinualSpec:
    raw = dict(raw or {})
    known = {f.name for f in dataclasses.fields(ContinualSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"continual: unknown key(s) {unknown}; known: {sorted(known)}")
    stages = raw.get("stages") or []
    if len(stages) < 1:
        raise ConfigError("continual.stages: name at least one stage ({path: manifest.csv})")
    raw["stages"] = [StageSpec(**(s if isinstance(s, dict) else {"path": s})) for s in stages]
    for key, cls in (("replay", ReplaySpec), ("distill", DistillSpec)):
        if isinstance(raw.get(key), dict):
            raw[key] = cls(**raw[key])
    return ContinualSpec(**raw)
