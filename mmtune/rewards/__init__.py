"""Rewards for reinforcement fine-tuning (GRPO): built-in verifiable rewards, the user's own functions
named `module:function`, and exported reward models, combined with weights.

A floor below the tasks: a reward sees prompts, completions and the rows' metadata columns, never
the model being trained or the config.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from mmtune.errors import ConfigError, DataError
from mmtune.rewards.builtin import BUILTIN_REWARDS, exact_match, final_answer, length_penalty, regex_format

__all__ = ["BUILTIN_REWARDS", "Reward", "RewardSpec", "build_rewards", "combine_rewards", "exact_match",
           "final_answer", "length_penalty", "regex_format", "score_rewards"]

USER_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class RewardSpec:
    """One reward of a GRPO run.

    Args:
        function: a built-in (`exact_match`, `regex_format`, `length_penalty`) or a function of your own
            as `module:function` (importable, e.g. `my_rewards:has_citation`), called with keyword
            arguments `prompts` (each prompt's turns), `completions` (texts), `completion_lengths`
            (tokens) and the prompt rows' other columns, returning one float (or None) per completion.
        model: instead of a function, a reward model folder written by `mmtune export` of a
            `RewardModelTask` run: its score of (prompt, completion) is the reward.
        weight: factor of this reward in the sum the advantages are computed from.
        name: the name in the logs (`train/reward/<name>`); default: the function's or `reward_model`.
        kwargs: settings passed to the function (e.g. `{pattern: "<answer>.*</answer>"}`).
    """

    function: Optional[str] = None
    model: Optional[str] = None
    weight: float = 1.0
    name: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.function is None) == (self.model is None):
            raise ConfigError("a reward needs exactly one of `function` (a built-in or module:function) and `model` "
                              f"(an exported reward model folder); got function={self.function!r}, model={self.model!r}")
        if self.function is not None and self.function not in BUILTIN_REWARDS and not USER_FUNCTION.match(self.function):
            raise ConfigError(f"reward function {self.function!r} is neither a built-in "
                              f"({', '.join(sorted(BUILTIN_REWARDS))}) nor `module:function`")
        if not math.isfinite(self.weight):
            raise ConfigError(f"reward weight must be a finite number, got {self.weight}")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return "reward_model" if self.model else self.function.rsplit(":", 1)[-1]


@dataclass
class Reward:
    """A resolved reward: `fn(**context) -> list[float | None]`, its weight and log name."""

    name: str
    weight: float
    fn: Callable[..., Sequence[Optional[float]]]


def _user_function(path: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"reward function {path!r}: cannot import {module_name!r} ({err}); is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward function {path!r}: {module_name!r} has no function {attr!r}")
    return fn


def build_rewards(specs: Sequence[RewardSpec], device: Optional[torch.device] = None) -> list[Reward]:
    """Resolves reward specs into callables. User modules are imported and reward models loaded here,
    never when a checkpoint is read: call it when training or evaluation starts.

    Raises:
        ConfigError: no rewards, an unimportable function, or an unreadable reward model.
    """
    if not specs:
        raise ConfigError("GRPO needs at least one reward (rewards: [{function: exact_match}, ...])")
    out: list[Reward] = []
    seen: dict[str, int] = {}
    for spec in specs:
        if spec.model is not None:
            from mmtune.rewards.model import RewardModelScorer

            fn: Callable = RewardModelScorer(spec.model, device=device, **spec.kwargs)
        else:
            base = BUILTIN_REWARDS.get(spec.function) if spec.function in BUILTIN_REWARDS else _user_function(spec.function)
            fn = _with_kwargs(base, spec.kwargs)
        name = spec.label
        seen[name] = seen.get(name, 0) + 1
        out.append(Reward(name if seen[name] == 1 else f"{name}_{seen[name]}", spec.weight, fn))
    return out


def _with_kwargs(fn: Callable, kwargs: dict) -> Callable:
    if not kwargs:
        return fn
    return lambda **context: fn(**{**context, **kwargs})


def score_rewards(rewards: Sequence[Reward], context: dict) -> dict[str, torch.Tensor]:
    """Each reward's float64 score per completion (NaN where a function returned None).

    Raises:
        DataError: a function returned the wrong number of scores or a non-number.
    """
    n = len(context["completions"])
    out = {}
    for reward in rewards:
        values = list(reward.fn(**context))
        if len(values) != n:
            raise DataError(f"reward {reward.name!r} returned {len(values)} scores for {n} completions")
        try:
            out[reward.name] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float64)
        except (TypeError, ValueError):
            raise DataError(f"reward {reward.name!r} returned a value that is not a number: {values[:4]}") from None
    return out


def combine_rewards(rewards: Sequence[Reward], scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weighted sum of the rewards per completion, a missing score (NaN) counting as 0 (TRL's nansum)."""
    stacked = torch.stack([scores[r.name] * r.weight for r in rewards], dim=1)
    return torch.nansum(stacked, dim=1)
