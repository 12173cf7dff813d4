"""Direct preference optimization (DPO, IPO) of causal language models on (prompt, chosen, rejected) data."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from mmtune.data.text_tokens import IGNORE
from mmtune.errors import ConfigError
from mmtune.losses.chunked import linear_token_loss_per_row
from mmtune.metrics.records import SampleRecord
from mmtune.models.lm_head import hidden_states, split_head
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec, as_spec, spec_to_dict
from mmtune.tasks import common
from mmtune.tasks.sft import CausalLMTask, GenerationSpec


@dataclass
class PreferenceSpec:
    """The preference loss.

    Args:
        beta: strength of the pull towards the reference model (DPO's KL weight).
        loss: `sigmoid` (DPO) or `ipo` (IPO: squared loss on length-normalized log-ratios).
    """

    beta: float = 0.1
    loss: Literal["sigmoid", "ipo"] = "sigmoid"


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's labeled tokens, and the number of those tokens."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    mask = shift_labels != IGNORE
    token_logps = torch.gather(shift_logits.log_softmax(-1), 2, shift_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)


def preference_terms(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, spec: PreferenceSpec
                     ) -> dict[str, torch.Tensor]:
    """Per-pair loss and diagnostics from log-probabilities of [chosen..., rejected...] rows.

    Returns:
        `[pairs]` tensors: `loss` (the term to minimize), `reward_margin` (beta-scaled chosen-minus-
        rejected implicit reward) and `accuracy` (1 where the chosen reply gets the higher reward).
    """
    n = len(policy) // 2
    ratios = policy - reference
    if spec.loss == "ipo":
        ratios = ratios / counts.clamp(min=1)
    diff = ratios[:n] - ratios[n:]
    if spec.loss == "sigmoid":
        loss = -F.logsigmoid(spec.beta * diff)
    else:
        loss = (diff - 1 / (2 * spec.beta)) ** 2
    rewards = spec.beta * (policy - reference).detach()
    margin = rewards[:n] - rewards[n:]
    return {"loss": loss, "reward_margin": margin, "accuracy": (margin > 0).float()}


def preference_loss(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, spec: PreferenceSpec
                    ) -> dict[str, torch.Tensor]:
    """`preference_terms` averaged over the batch's pairs: `loss`, mean `reward_margin`, `accuracy`
    (share of pairs whose chosen reply gets the higher reward)."""
    return {name: value.mean() for name, value in preference_terms(policy, reference, counts, spec).items()}


@common.TASKS.register("dpo")
class DPOTask(CausalLMTask):
    """Preference tuning with DPO or IPO against a frozen reference model.

    With an adapter the reference is the same network with its adapters switched off (no second copy
    in memory); a full fine-tune keeps a frozen copy of the starting weights.

    Args:
        model, adapter, optimizer, monitor, chat_template, gradient_checkpointing, generation,
        checkpoint_weights, predictions_file, chunked_loss: as in `CausalLMTask`.
        preference: beta and loss variant.
    """

    # Rewards are measured against the reference model: an exported model as the baseline would be its
    # own reference (every reward 0), so `mmtune evaluate` takes DPO checkpoints (reference: the base).
    baseline_from_export = False
    record_kind = "preference"  # a test record per pair

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterSpec = AdapterSpec(method="lora"),
        optimizer: OptimizerSpec = OptimizerSpec(lr=5e-5, weight_decay=0.0),
        monitor: MonitorSpec = MonitorSpec(),
        chat_template: Optional[str] = None,
        gradient_checkpointing: bool = False,
        generation: GenerationSpec = GenerationSpec(),
        checkpoint_weights: Literal["auto", "trainable", "full"] = "auto",
        predictions_file: Optional[str] = None,
        preference: PreferenceSpec = PreferenceSpec(),
        chunked_loss: bool = True,
    ) -> None:
        super().__init__(model, adapter, optimizer, monitor, chat_template, gradient_checkpointing, generation,
                         checkpoint_weights, predictions_file, chunked_loss=chunked_loss)
        self.preference_spec = as_spec(PreferenceSpec, preference)
        if self.preference_spec.beta <= 0:
            raise ConfigError(f"preference.beta must be positive, got {self.preference_spec.beta}")
        self.hparams["preference"] = spec_to_dict(self.preference_spec)
        self._ref: Optional[torch.nn.Module] = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        super().configure_model()
        if self.adapter_spec.method == "none":
            # A full fine-tune changes every weight: the reference must be a frozen copy. It is kept out
            # of the module tree so checkpoints and the optimizer never see it.
            ref = copy.deepcopy(self.net).eval().requires_grad_(False)
            object.__setattr__(self, "_ref", ref)

    def _logps(self, net: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`sequence_logps` of `net` on a batch; chunked from the hidden states where the model allows
        (`chunked_loss`), so the full logits of chosen and rejected rows never exist."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        split = split_head(net) if self.hparams.get("chunked_loss", True) and self._device_mesh is None else None
        if split is None:
            return sequence_logps(net(**inputs, use_cache=False).logits, batch["labels"])
        sums, counts = linear_token_loss_per_row(hidden_states(split, inputs), split.head.weight, split.head.bias,
                                                 batch["labels"], rows=len(batch["labels"]))
        return -sums, counts

    def _reference_logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            if self._ref is not None:
                return self._logps(self._ref.to(self.device), batch)[0]
            with self.net.disable_adapter():
                return self._logps(self.net, batch)[0]

    def loss_terms(self, batch: dict, per_pair: bool = False) -> dict[str, torch.Tensor]:
        """`loss` to minimize plus `reward_margin` and `accuracy` for the logs: batch means, or `[pairs]`
        tensors with `per_pair`."""
        policy, counts = self._logps(self.net, batch)
        terms = preference_terms if per_pair else preference_loss
        return terms(policy, self._reference_logps(batch), counts, self.preference_spec)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        pairs = len(batch["input_ids"]) // 2
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=pairs)
        return terms["loss"]

    def sample_records(self, batch: dict) -> list[SampleRecord]:
        """One record per pair: its `loss`, `reward_margin` and `accuracy` (1/0), with the pair's origin
        as id and its metadata columns (the batch holds the chosen rows, then the rejected ones)."""
        terms = {name: value.tolist() for name, value in self.loss_terms(batch, per_pair=True).items()}
        pairs = len(batch["input_ids"]) // 2
        return [SampleRecord(id=batch["origins"][i], stats={name: values[i] for name, values in terms.items()},
                             meta=dict(batch["meta"][i])) for i in range(pairs)]

    def records_info(self) -> dict:
        return {**super().records_info(), "beta": self.preference_spec.beta, "loss": self.preference_spec.loss}

    def _log_metrics(self, stage: str, records: list[SampleRecord]) -> None:
        pairs = max(len(records), 1)
        for name in ("loss", "reward_margin", "accuracy"):
            self.log(f"{stage}/{name}", torch.tensor(sum(r.stats[name] for r in records) / pairs),
                     prog_bar=name == "loss")
