"""What every retention scorer shares: the registry by kind, the check that a kind fits the task, the
checks of a set's path, and running a task's model for scoring without disturbing its training.

A scorer reads and prepares its set once (at fit start, so bad data stops the run before training) and
then scores the task's current weights as often as asked: on the untuned model, at validations, at the
end. It uses only the tasks' public surface (`task(batch)`, `embed_images`, `classifier`, `tokenizer`).
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from mmtune.errors import ConfigError, DataError, MMTuneError
from mmtune.evaluation.retention.spec import RetentionSet
from mmtune.registry import Registry


class Scorer:
    """Scores one retention set on a task's current weights.

    Subclasses set `kind`, `needs` (the task family, for the error when a kind does not fit) and
    `default_metrics` (None: every metric is checked), and implement `fits`, `__init__` (read and
    prepare the set: raise DataError naming the set there) and `score`.

    Args:
        rset: the set.
        task: the task being fine-tuned (its model is built).
        runner: how to run the task's model (device, precision).
    """

    kind: str = ""
    needs: str = ""
    default_metrics: Optional[tuple[str, ...]] = None
    lower_is_better: tuple[str, ...] = ()

    def __init__(self, rset: RetentionSet, task: nn.Module, runner: "Runner") -> None:
        self.rset, self.runner = rset, runner

    @classmethod
    def fits(cls, task: nn.Module) -> bool:
        raise NotImplementedError

    def score(self, task: nn.Module) -> dict[str, float]:
        """The set's metrics for the task's current weights."""
        raise NotImplementedError

    def higher_is_better(self, metric: str) -> bool:
        return metric not in self.lower_is_better

    def state(self) -> dict:
        """What must survive a resume besides the untuned scores (e.g. the untuned model's features)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def fail(self, message: str) -> DataError:
        """A DataError naming the set and its path."""
        return DataError(f"retention set {self.rset.name!r} ({self.rset.kind}, {self.rset.path}): {message}")


SCORERS: Registry[type[Scorer]] = Registry("retention kind")


def scorer_class(rset: RetentionSet, task: nn.Module) -> type[Scorer]:
    """The scorer of `rset.kind`, refusing a kind that does not fit the task."""
    _register_builtin()
    cls = SCORERS.get(rset.kind)
    if not cls.fits(task):
        raise ConfigError(f"retention set {rset.name!r}: kind {rset.kind} needs {cls.needs}; this run is a "
                          f"{type(task).__name__}")
    return cls


def build_scorer(rset: RetentionSet, task: nn.Module, runner: "Runner") -> Scorer:
    """The prepared scorer of one set; DataErrors from mmtune's readers come back naming the set."""
    cls = scorer_class(rset, task)
    try:
        return cls(rset, task, runner)
    except DataError as err:
        if str(err).startswith(f"retention set {rset.name!r}"):
            raise
        raise DataError(f"retention set {rset.name!r} ({rset.kind}, {rset.path}): {err}") from None


def check_source(rset: RetentionSet) -> None:
    """A set's path must exist and hold something: checked at fit start, before any model is built.

    Raises:
        DataError: naming the set and the path, when it is missing, an empty file or an empty folder.
    """
    path = Path(rset.path).expanduser()
    where = f"retention set {rset.name!r} ({rset.kind})"
    if not path.exists():
        raise DataError(f"{where}: {path} not found")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{where}: {path} is empty")
    if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
        raise DataError(f"{where}: the folder {path} is empty")


def _register_builtin() -> None:
    """Imports the built-in scorers (each file registers its kinds); lazily, so that importing the spec
    does not import every task."""
    from mmtune.evaluation.retention import alignment, text, vision  # noqa: F401


# ---- running the model ---------------------------------------------------------------------------------
class Runner:
    """Runs a task's model for scoring: on its device, with the trainer's precision (autocast, or inputs
    cast for true half precision), without gradients, in eval mode, and without touching the RNGs
    training uses (dropout masks and data order stay those of a run without retention checks).

    Args:
        device: where the model is.
        precision: the trainer's precision plugin (`trainer.precision_plugin`), or None for plain float.
        image_size: the data module's `image_size` override, so images are scored at the size the
            model trains at.
    """

    def __init__(self, device: torch.device, precision: Any = None, image_size: Optional[int] = None) -> None:
        self.device, self.precision, self.image_size = device, precision, image_size

    @classmethod
    def for_trainer(cls, trainer, task: nn.Module) -> "Runner":
        image_size = getattr(trainer.datamodule, "image_size", None) if trainer.datamodule is not None else None
        return cls(task.device, getattr(trainer, "precision_plugin", None), image_size)

    def batch(self, batch: Any) -> Any:
        from lightning.pytorch.utilities import move_data_to_device

        batch = move_data_to_device(batch, self.device)
        return self.precision.convert_input(batch) if self.precision is not None else batch

    def context(self) -> contextlib.AbstractContextManager:
        return self.precision.forward_context() if self.precision is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def scoring(self, module: nn.Module) -> Iterator[None]:
        """Eval mode, no gradients and preserved RNG states around a scoring pass; every submodule's
        own mode is restored after (frozen parts may be in eval mode while others train)."""
        modes = {m: m.training for m in module.modules()}
        rng = _rng_states()
        module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, training in modes.items():
                m.training = training
            _set_rng_states(rng)

    def run(self, fn: Callable[[Any], Any], batch: Any) -> Any:
        """`fn(batch)` with the batch on the device and the precision's forward context."""
        with self.context():
            return fn(self.batch(batch))


def _rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def limited(rows: list, limit: Optional[int]) -> list:
    """The first `limit` rows (all with None): a deterministic subset, the same before and after."""
    return rows if limit is None else rows[:limit]


class RetentionError(MMTuneError):
    """A retention check with `action: fail` found a larger drop than allowed (raised at the end of fit,
    after the checkpoints and metrics.json are written)."""
