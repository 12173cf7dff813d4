"""The GRPO objective (Shao et al. 2024, DeepSeekMath) as TRL's `GRPOTrainer` computes it:
group-normalised advantages, a PPO-style clipped ratio to the policy that generated the samples, and a
k3 estimate of the KL divergence to a reference model.

Pure tensor functions, so a test can check them against a hand computation and against TRL.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch

from mmtune.losses.tokens import global_token_mean

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ScaleRewards = Literal["group", "batch", "none"]
STD_EPS = 1e-4  # TRL's: keeps a group whose rewards are all equal at advantage 0, not NaN


def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "group") -> torch.Tensor:
    """Each completion's reward minus its group's mean, divided by the group's standard deviation
    (`group`), the whole batch's (`batch`, PPO-Lite), or not at all (`none`, Dr. GRPO).

    Args:
        rewards: `[prompts * group_size]`, the completions of a prompt next to each other.
        group_size: completions per prompt (G).
    """
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        advantages = advantages / (grouped.std(dim=1).repeat_interleave(group_size) + STD_EPS)
    elif scale == "batch":
        advantages = advantages / (rewards.std() + STD_EPS)
    return advantages


def token_logps(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of `ids` `[N, L]` under `logits` `[N, L, V]` (already aligned: the logits that
    predict each id), at the sampling temperature, in float32."""
    scaled = logits.float() / temperature
    return torch.gather(scaled.log_softmax(-1), 2, ids.unsqueeze(-1)).squeeze(-1)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              ref_logps: Optional[torch.Tensor] = None, beta: float = 0.0, epsilon_low: float = 0.2,
              epsilon_high: Optional[float] = None, loss_type: LossType = "dapo",
              max_completion_length: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The clipped GRPO loss of a batch of completions and its diagnostics.

    Per token: `-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * kl`, with `r` the ratio of
    the current to the generating policy (1 at the first step after a generation: the clip matters from
    the second of `num_iterations` steps on) and `kl = exp(ref - logp) - (ref - logp) - 1`. Aggregated
    by `loss_type`: `grpo` averages each completion's tokens then the completions (length-biased),
    `bnpo` averages all tokens of the batch, `dapo` all tokens of the global batch of every process,
    `dr_grpo` divides the token sum by completions x `max_completion_length`.

    Args:
        logps, old_logps, ref_logps: `[N, L]` token log-probabilities of the completions.
        mask: `[N, L]`, 1 on completion tokens (up to and including the stop token), 0 after.
        advantages: `[N]`.

    Returns:
        `loss`; `kl` (mean per token, when `ref_logps` is given); `clip_ratio` with `clip_ratio_low`
        and `clip_ratio_high`: the share of tokens whose ratio left the clip range on the side where
        the clip takes away the gradient.
    """
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype).unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    terms: dict[str, torch.Tensor] = {}
    tokens = mask.sum().clamp(min=1)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if beta:
            per_token = per_token + beta * kl
        terms["kl"] = ((kl * mask).sum() / tokens).detach()
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / tokens
    elif loss_type == "dapo":
        loss = global_token_mean((per_token * mask).sum(), mask.sum())[0]
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (len(per_token) * max_completion_length)
    else:
        raise ValueError(f"unknown GRPO loss type {loss_type!r}")
    low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype)
    terms["clip_ratio_low"] = ((low * mask).sum() / tokens).detach()
    terms["clip_ratio_high"] = ((high * mask).sum() / tokens).detach()
    terms["clip_ratio"] = terms["clip_ratio_low"] + terms["clip_ratio_high"]
    return {"loss": loss, **terms}
