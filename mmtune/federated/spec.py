"""The `federated:` section (or `--federated fed.yaml`) as typed dataclasses.

The section is read by the verb; components receive these dataclasses, never the YAML.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from mmtune.errors import ConfigError

STRATEGIES = ("fedavg", "fedprox", "fedadam")


@dataclass
class PrivacySpec:
    """Differential privacy with Flower's fixed-clipping wrappers (server side: the server clips each
    site's update and adds Gaussian noise to the aggregate).

    Args:
        noise_multiplier: noise standard deviation as a multiple of the clipping norm; 0 disables DP.
        clipping_norm: L2 bound on each site's update.
    """

    noise_multiplier: float = 0.0
    clipping_norm: float = 1.0

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


@dataclass
class SecAggSpec:
    """Settings of Flower's SecAgg+ (used when `federated.secure_aggregation` is true).

    Args:
        num_shares: shares of each site's secret (int > 2, or a share of the sampled sites).
        reconstruction_threshold: shares needed to rebuild a secret (int, or a share of num_shares).
        clipping_range: each tensor value is clipped to +-this before quantization.
        max_weight: the largest weight (training samples) of one site.
        timeout: seconds to wait for the sites' replies in each stage (None: no limit).
    """

    num_shares: float = 1.0
    reconstruction_threshold: float = 0.67
    clipping_range: float = 8.0
    max_weight: float = 1000.0
    timeout: Optional[float] = None


@dataclass
class SimulationSpec:
    """How `--simulate N` splits one data set into N sites.

    Args:
        sites: number of simulated sites (0: not a simulation).
        partition_by: a manifest column whose values name the sites (the N most frequent values), or
            `dirichlet` for a seeded non-IID label split.
        alpha: Dirichlet concentration (small: each site sees few classes).
        seed: seed of the Dirichlet split.
    """

    sites: int = 0
    partition_by: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0


@dataclass
class FederatedSpec:
    """Rounds, sampling, local work, aggregation.

    Args:
        rounds: server rounds.
        strategy: `fedavg` (weighted by samples), `fedprox` (FedAvg plus a proximal term at the sites)
            or `fedadam` (server-side Adam on the averaged update).
        fraction_fit: share of sites trained each round (at least `min_sites`).
        fraction_evaluate: share of sites that score the global model on their validation split.
        min_sites: the fewest sites a round needs.
        local_epochs: epochs each site trains per round.
        local_steps: optimizer steps per round instead of epochs (0: use `local_epochs`).
        proximal_mu: FedProx's mu.
        server_lr: FedAdam's eta (server learning rate); `server_lr_local` is its eta_l.
        server_lr_local: FedAdam's eta_l.
        tau: FedAdam's adaptivity.
        test_path: a server-side test set (passed as the data module's `path`); its test split scores
            the global model after every round.
        privacy: differential privacy.
        secure_aggregation: aggregate with Flower's SecAgg+ (FedAvg only; see `mmtune.federated.secure`).
        secagg: the SecAgg+ settings.
        simulation: how `--simulate` splits the data.
    """

    rounds: int = 3
    strategy: str = "fedavg"
    fraction_fit: float = 1.0
    fraction_evaluate: float = 1.0
    min_sites: int = 1
    local_epochs: int = 1
    local_steps: int = 0
    proximal_mu: float = 0.01
    server_lr: float = 0.1
    server_lr_local: float = 0.1
    tau: float = 1e-3
    test_path: Optional[str] = None
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    secure_aggregation: bool = False
    secagg: SecAggSpec = field(default_factory=SecAggSpec)
    simulation: SimulationSpec = field(default_factory=SimulationSpec)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"federated.strategy: {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.rounds < 1:
            raise ConfigError("federated.rounds must be at least 1")
        for key in ("fraction_fit", "fraction_evaluate"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"federated.{key} must lie in [0, 1]")


def federated_spec(raw: Optional[dict]) -> FederatedSpec:
    """A FederatedSpec from the plain dict of a YAML section; unknown keys are named in the error."""
    raw = dict(raw or {})
    nested = {"privacy": PrivacySpec, "simulation": SimulationSpec, "secagg": SecAggSpec}
    known = {f.name for f in dataclasses.fields(FederatedSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"federated: unknown key(s) {unknown}; known: {sorted(known)}")
    for key, cls in nested.items():
        value = raw.get(key)
        if isinstance(value, dict):
            fields = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(value) - fields)
            if bad:
                raise ConfigError(f"federated.{key}: unknown key(s) {bad}; known: {sorted(fields)}")
            raw[key] = cls(**value)
    return FederatedSpec(**raw)


def read_configs(task_yaml: str, federated_yaml: Optional[str]) -> tuple[dict, FederatedSpec]:
    """The task config (without its `federated:` section) and the federated spec, from the task YAML's
    `federated:` section or a separate file (the file wins)."""
    path = Path(task_yaml)
    if not path.is_file():
        raise ConfigError(f"--config {task_yaml}: file not found")
    task = yaml.safe_load(path.read_text()) or {}
    section = task.pop("federated", None)
    if federated_yaml:
        fed_path = Path(federated_yaml)
        if not fed_path.is_file():
            raise ConfigError(f"--federated {federated_yaml}: file not found")
        loaded = yaml.safe_load(fed_path.read_text()) or {}
        section = loaded.get("federated", loaded)
    return task, federated_spec(section)
