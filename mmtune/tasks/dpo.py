"""Preference tuning of causal language models: DPO, IPO, ORPO, SimPO on (prompt, chosen, rejected) pairs and
KTO on unpaired (prompt, completion, label) rows. The losses are pure functions in `mmtune.losses.preference`."""

from __future__ import annotations

import copy
from typing import Literal, Optional

import torch

from mmtune.errors import ConfigError
from mmtune.losses.chunked import linear_token_loss_per_row
from mmtune.losses.preference import (PREFERENCE_LOSSES, PreferenceSpec, SequenceLogps,  # noqa: F401 (re-export)
                                     batch_means, sequence_logps)
from mmtune.metrics.records import SampleRecord
from mmtune.models.lm_head import hidden_states, split_head
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec, as_spec, spec_to_dict
from mmtune.tasks import common
from mmtune.tasks.sft import CausalLMTask, GenerationSpec


def preference_terms(policy: torch.Tensor, reference: Optional[torch.Tensor], counts: torch.Tensor,
                     spec: PreferenceSpec) -> dict[str, torch.Tensor]:
    """Per-pair terms of a paired loss from log-probabilities of [chosen..., rejected...] rows
    (`reference` may be None for the reference-free losses): `loss`, `reward_margin`, `accuracy`, ..."""
    return PREFERENCE_LOSSES.get(spec.loss).compute(SequenceLogps(policy, counts, reference), spec)


def preference_loss(policy: torch.Tensor, reference: Optional[torch.Tensor], counts: torch.Tensor,
                    spec: PreferenceSpec) -> dict[str, torch.Tensor]:
    """`preference_terms` averaged over the batch's pairs."""
    return batch_means(preference_terms(policy, reference, counts, spec))


@common.TASKS.register("dpo")
class DPOTask(CausalLMTask):
    """Preference tuning with DPO, IPO, KTO, ORPO or SimPO (`preference.loss`).

    DPO, IPO and KTO measure rewards against a frozen reference model: with an adapter it is the same
    network with its adapters switched off (no second copy in memory); a full fine-tune keeps a frozen
    copy of the starting weights. ORPO and SimPO need no reference: no copy and no reference pass.

    Args:
        model, adapter, optimizer, monitor, chat_template, gradient_checkpointing, generation,
        checkpoint_weights, predictions_file, chunked_loss: as in `CausalLMTask`.
        preference: the loss and its hyperparameters.
    """

    # Rewards are measured against the reference model: an exported model as the baseline would be its
    # own reference (every reward 0), so `mmtune evaluate` takes DPO checkpoints (reference: the base).
    baseline_from_export = False
    record_kind = "preference"  # a test record per pair (KTO: per row)

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
        self.preference_loss = PREFERENCE_LOSSES.get(self.preference_spec.loss)
        if self.preference_loss.needs_reference and self.adapter_spec.rewrites_base:
            raise ConfigError(f"adapter.init {self.adapter_spec.init!r} rewrites the base weights, so the base with "
                              f"adapters off is no longer the starting model that preference.loss "
                              f"{self.preference_spec.loss!r} measures rewards against; use init default or gaussian, "
                              "or a reference-free loss (orpo, simpo)")
        self.hparams["preference"] = spec_to_dict(self.preference_spec)
        self._ref: Optional[torch.nn.Module] = None

    def connect_data(self, dm) -> None:
        if hasattr(dm, "unpaired"):  # preference data: KTO reads one row per completion
            dm.connect(self.tokenizer, unpaired=self.preference_loss.unpaired)
        else:
            dm.connect(self.tokenizer)

    def configure_model(self) -> None:
        if self.net is not None:
            return
        super().configure_model()
        if self.adapter_spec.method == "none" and self.preference_loss.needs_reference:
            # A full fine-tune changes every weight: the reference must be a frozen copy. It is kept out
            # of the module tree so checkpoints and the optimizer never see it.
            ref = copy.deepcopy(self.net).eval().requires_grad_(False)
            object.__setattr__(self, "_ref", ref)

    def _logps(self, net: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`sequence_logps` of `net` on a batch; chunked from the hidden states where the model allows
        (`chunked_loss`), so the full logits of chosen and rejected rows never exist."""
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        split = split_head(net) if self.hparams.get("chunked_loss", True) and self._device_mesh is None else None
        if split is None:  # prompt tuning's virtual tokens come first in the logits: keep the real positions
            return sequence_logps(net(**inputs, use_cache=False).logits[:, -batch["labels"].shape[1]:], batch["labels"])
        sums, counts = linear_token_loss_per_row(hidden_states(split, inputs), split.head.weight, split.head.bias,
                                                 batch["labels"], rows=len(batch["labels"]))
        return -sums, counts

    def _reference_logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            if self._ref is not None:
                return self._logps(self._ref.to(self.device), batch)[0]
            with self.net.disable_adapter():
                return self._logps(self.net, batch)[0]

    def measure(self, batch: dict) -> SequenceLogps:
        """What the chosen loss needs from the model on one batch (only that: no reference pass for the
        reference-free losses; for KTO, also the mismatched rows that estimate its reference point)."""
        needs_reference = self.preference_loss.needs_reference
        if not self.preference_loss.unpaired:
            policy, counts = self._logps(self.net, batch)
            return SequenceLogps(policy, counts, self._reference_logps(batch) if needs_reference else None)
        n = len(batch["desirable"])
        rows = _rows(batch, slice(0, n))
        policy, counts = self._logps(self.net, rows)
        with torch.no_grad():
            kl_policy = self._logps(self.net, _rows(batch, slice(n, 2 * n)))[0]
        reference = self._reference_logps(batch)  # matched and mismatched rows in one pass
        return SequenceLogps(policy, counts, reference[:n], batch["desirable"], kl_policy, reference[n:])

    def loss_terms(self, batch: dict, per_pair: bool = False) -> dict[str, torch.Tensor]:
        """`loss` to minimize plus the loss's diagnostics (`reward_margin`, `accuracy`, ...): batch means,
        or per-example tensors with `per_pair` (per pair; KTO: per row)."""
        terms = self.preference_loss.compute(self.measure(batch), self.preference_spec)
        return terms if per_pair else batch_means(terms)

    def _examples(self, batch: dict) -> int:
        return len(batch["desirable"]) if "desirable" in batch else len(batch["input_ids"]) // 2

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=self._examples(batch))
        return terms["loss"]

    def sample_records(self, batch: dict) -> list[SampleRecord]:
        """One record per pair (KTO: per row): its loss terms (`loss`, `reward_margin` or `reward`,
        `accuracy` 1/0, ...), with its origin as id and its metadata columns (a paired batch holds the
        chosen rows, then the rejected ones)."""
        terms = {name: value.tolist() for name, value in self.loss_terms(batch, per_pair=True).items() if value.ndim}
        if "desirable" in batch:
            terms["desirable"] = batch["desirable"].float().tolist()
        return [SampleRecord(id=batch["origins"][i], stats={name: values[i] for name, values in terms.items()},
                             meta=dict(batch["meta"][i])) for i in range(self._examples(batch))]

    def records_info(self) -> dict:
        spec = self.preference_spec
        return {**super().records_info(), "beta": spec.beta, "loss": spec.loss}

    def _log_metrics(self, stage: str, records: list[SampleRecord]) -> None:
        count = max(len(records), 1)
        names = [name for name in (records[0].stats if records else {"loss": 0}) if name != "desirable"]
        for name in names:
            self.log(f"{stage}/{name}", torch.tensor(sum(r.stats.get(name, 0.0) for r in records) / count),
                     prog_bar=name == "loss")
        if records and "desirable" in records[0].stats:  # KTO: mean reward of desirable minus undesirable rows
            means = [_mean([r.stats["reward"] for r in records if r.stats["desirable"] == label]) for label in (1.0, 0.0)]
            self.log(f"{stage}/reward_margin", torch.tensor(means[0] - means[1]))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _rows(batch: dict, rows: slice) -> dict:
    """The model inputs and labels of some rows of a batch."""
    return {k: batch[k][rows] for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
