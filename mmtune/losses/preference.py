"""Preference losses (DPO, IPO, KTO, ORPO, SimPO) as pure functions of sequence log-probabilities.

Every function takes per-row summed log-probabilities of the completions (and, where the loss needs
them, the reference model's and the completions' token counts) and returns named per-example terms:
`loss` (what to minimize, one value per pair or per row), plus diagnostics such as `reward_margin`
and `accuracy`. The task averages them over the batch and logs each (open_clip's style). A loss is
chosen by name from `PREFERENCE_LOSSES`, whose entries also say what the task must compute for it:
a reference forward pass (DPO, IPO, KTO) or none (ORPO, SimPO), paired rows or unpaired ones (KTO).

The formulas follow the papers and TRL 1.16, and the tests check them against both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

from mmtune.data.text_tokens import IGNORE
from mmtune.errors import ConfigError
from mmtune.registry import Registry

LossName = Literal["dpo", "sigmoid", "ipo", "kto", "orpo", "simpo"]


@dataclass
class PreferenceSpec:
    """Which preference loss, and its hyperparameters.

    Args:
        loss: `dpo` (alias `sigmoid`): the DPO sigmoid loss; `ipo`: squared loss on length-normalized
            log-ratios; `kto`: unpaired rows labeled desirable/undesirable (paired rows are split into
            one of each); `orpo`: SFT loss plus an odds-ratio term, no reference model; `simpo`:
            length-normalized margin loss, no reference model.
        beta: DPO/IPO/KTO: strength of the pull towards the reference (DPO's KL weight; IPO's tau);
            SimPO: the reward scale (the paper uses 2.0-2.5).
        gamma: SimPO's target reward margin (TRL's `simpo_gamma`).
        orpo_lambda: weight of ORPO's odds-ratio term against its SFT term (TRL's ORPO `beta`).
        desirable_weight: KTO's weight of desirable rows' losses.
        undesirable_weight: KTO's weight of undesirable rows' losses (raise it when undesirable rows
            are rarer, so both kinds weigh about the same).
    """

    beta: float = 0.1
    loss: LossName = "dpo"
    gamma: float = 0.5
    orpo_lambda: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ConfigError(f"preference.beta must be positive, got {self.beta}")
        for name in ("orpo_lambda", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"preference.{name} must be 0 or more, got {getattr(self, name)}")


# ---- the losses, on plain tensors ------------------------------------------------------------------------

def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's labeled tokens (float32), and the number of those tokens.
    Decoder-only models predict the next token (`shift`); an encoder-decoder's logits line up with its labels."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    token_logps = torch.gather(logits.float().log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> dict[str, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): `-log sigmoid(beta * (chosen log-ratio - rejected log-ratio))`.

    Args: `[pairs]` summed log-probabilities of the chosen and rejected replies under the policy and
    the reference. Returns `[pairs]` terms `loss`, `reward_margin` (beta-scaled) and `accuracy`.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return {"loss": loss, **_margin(beta * chosen_ratio, beta * rejected_ratio)}


def ipo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """IPO (Azar et al. 2023, eq. 17): `(chosen - rejected per-token log-ratio - 1 / (2 beta))**2`, with the
    log-ratios divided by each reply's token count (as TRL does, agreed with the IPO authors)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
    loss = (delta - 1 / (2 * beta)) ** 2
    return {"loss": loss, **_margin(beta * chosen_ratio, beta * rejected_ratio)}


def simpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
               rejected_tokens: torch.Tensor, beta: float, gamma: float) -> dict[str, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): `-log sigmoid(beta * (mean chosen logp - mean rejected logp) - gamma)`,
    the means taken per token of each reply; no reference model (TRL: CPO with `loss_type="simpo"`,
    `cpo_alpha=0`)."""
    chosen_mean, rejected_mean = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
    loss = -F.logsigmoid(beta * (chosen_mean - rejected_mean) - gamma)
    return {"loss": loss, **_margin(beta * chosen_mean, beta * rejected_mean)}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """`log(1 - exp(x))` for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    """ORPO (Hong et al. 2024, eq. 6-7): the chosen reply's per-token NLL minus
    `lam * log sigmoid(log odds(chosen) - log odds(rejected))`, with `odds(y) = P / (1 - P)` of the
    per-token mean probability; no reference model.

    The NLL is each pair's own per-token mean (then averaged over pairs), so a pair's record and the
    batch loss agree; TRL takes one token mean over the whole batch, which weights long replies more.
    Returns `[pairs]` `loss`, `nll`, `log_odds`, `reward_margin` (`lam` times the mean-logp margin), `accuracy`.
    """
    chosen_mean = chosen.float() / chosen_tokens.clamp(min=1)
    rejected_mean = rejected.float() / rejected_tokens.clamp(min=1)
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    nll = -chosen_mean
    loss = nll - lam * F.logsigmoid(log_odds)
    return {"loss": loss, "nll": nll.detach(), "log_odds": log_odds.detach(),
            **_margin(lam * chosen_mean, lam * rejected_mean)}


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, kl_policy: torch.Tensor,
             kl_reference: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7-8) on unpaired rows.

    The reference point is the KL between policy and reference, estimated from mismatched (prompt,
    completion) rows of the same batch: `z = max(0, mean(kl_policy - kl_reference))`, held constant
    (detached). A desirable row loses `1 - sigmoid(beta * (log-ratio - z))`, an undesirable one
    `1 - sigmoid(beta * (z - log-ratio))`, weighted by `desirable_weight`/`undesirable_weight`.

    Args:
        policy, reference: `[rows]` summed log-probabilities of each row's completion.
        desirable: `[rows]` bool labels.
        kl_policy, kl_reference: `[rows]` log-probabilities of the mismatched completions.
    Returns:
        `[rows]` `loss`, `reward` (beta * log-ratio), `accuracy` (the reward's sign matches the label),
        and the scalar `kl`.
    """
    desirable = desirable.bool()
    kl = (kl_policy - kl_reference).mean().detach().clamp(min=0)
    ratio = policy - reference
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    reward = beta * ratio.detach()
    return {"loss": loss, "reward": reward, "accuracy": ((reward > 0) == desirable).float(), "kl": kl}


def _margin(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict[str, torch.Tensor]:
    margin = (chosen_reward - rejected_reward).detach()
    return {"reward_margin": margin, "accuracy": (margin > 0).float()}


# ---- selection by name -----------------------------------------------------------------------------------

@dataclass
class SequenceLogps:
    """What a task measured for one batch: per-row summed completion log-probabilities and token counts.

    Paired losses read rows as `[chosen..., rejected...]`; KTO reads unpaired rows with `desirable`
    labels, and `kl_policy`/`kl_reference` for the mismatched rows. `reference` is None for the
    reference-free losses.
    """

    policy: torch.Tensor
    tokens: torch.Tensor
    reference: Optional[torch.Tensor] = None
    desirable: Optional[torch.Tensor] = None
    kl_policy: Optional[torch.Tensor] = None
    kl_reference: Optional[torch.Tensor] = None

    def halves(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(values) // 2
        return values[:n], values[n:]


@dataclass(frozen=True)
class PreferenceLoss:
    """A registered loss: how to call it on a batch, and what the task must measure for it."""

    compute: Callable[[SequenceLogps, PreferenceSpec], dict[str, torch.Tensor]]
    needs_reference: bool = True
    unpaired: bool = False


PREFERENCE_LOSSES: Registry[PreferenceLoss] = Registry("preference loss")


def _dpo(x: SequenceLogps, spec: PreferenceSpec) -> dict[str, torch.Tensor]:
    return dpo_loss(*x.halves(x.policy), *x.halves(x.reference), spec.beta)


def _ipo(x: SequenceLogps, spec: PreferenceSpec) -> dict[str, torch.Tensor]:
    return ipo_loss(*x.halves(x.policy), *x.halves(x.reference), *x.halves(x.tokens), spec.beta)


def _simpo(x: SequenceLogps, spec: PreferenceSpec) -> dict[str, torch.Tensor]:
    return simpo_loss(*x.halves(x.policy), *x.halves(x.tokens), spec.beta, spec.gamma)


def _orpo(x: SequenceLogps, spec: PreferenceSpec) -> dict[str, torch.Tensor]:
    return orpo_loss(*x.halves(x.policy), *x.halves(x.tokens), spec.orpo_lambda)


def _kto(x: SequenceLogps, spec: PreferenceSpec) -> dict[str, torch.Tensor]:
    return kto_loss(x.policy, x.reference, x.desirable, x.kl_policy, x.kl_reference, spec.beta,
                    spec.desirable_weight, spec.undesirable_weight)


PREFERENCE_LOSSES.register("dpo")(PreferenceLoss(_dpo))
PREFERENCE_LOSSES.register("sigmoid")(PreferenceLoss(_dpo))  # the name DPO's loss had before (TRL's loss_type)
PREFERENCE_LOSSES.register("ipo")(PreferenceLoss(_ipo))
PREFERENCE_LOSSES.register("simpo")(PreferenceLoss(_simpo, needs_reference=False))
PREFERENCE_LOSSES.register("orpo")(PreferenceLoss(_orpo, needs_reference=False))
PREFERENCE_LOSSES.register("kto")(PreferenceLoss(_kto, unpaired=True))


def batch_means(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-example terms averaged over the batch (scalars such as KTO's `kl` pass through)."""
    return {name: value.mean() if value.ndim else value for name, value in terms.items()}
