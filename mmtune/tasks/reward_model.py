"""Reward models: a causal LM with a one-output head trained on (prompt, chosen, rejected) pairs with the
pairwise (Bradley-Terry) loss, `-log sigmoid(r_chosen - r_rejected)`; exported for GRPO's `rewards`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from mmtune.adapters import AdapterReport, apply_adapter, merged_copy, part_lookup
from mmtune.errors import ConfigError
from mmtune.metrics.records import SampleRecord
from mmtune.models.reward_model import load_reward_model, sequence_scores
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec
from mmtune.tasks import common
from mmtune.tasks.sft import CausalLMTask, GenerationSpec, save_merged_lm

PARTS_DOC = {"language": "the transformer blocks and norms", "embeddings": "input token embeddings",
             "head": "the reward head (score)"}


def pairwise_terms(scores: torch.Tensor, margin: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-pair Bradley-Terry loss from the scores of [chosen..., rejected...] rows, with the score margin
    and whether the chosen reply scored higher (`accuracy`). `margin` asks for at least that gap (Llama 2's
    margin loss)."""
    n = len(scores) // 2
    gap = scores[:n] - scores[n:]
    return {"loss": -F.logsigmoid(gap - margin), "reward_margin": gap.detach(), "accuracy": (gap > 0).float().detach()}


def reward_model_parts(model: torch.nn.Module) -> dict[str, Optional[list[str]]]:
    names = {id(m): n for n, m in model.named_modules()}
    parts: dict[str, Optional[list[str]]] = {"language": None}
    embed = names.get(id(model.get_input_embeddings()))
    if embed:
        parts["embeddings"] = [embed]
    if isinstance(getattr(model, "score", None), torch.nn.Module):
        parts["head"] = ["score"]
    return parts


@common.TASKS.register("reward_model")
class RewardModelTask(CausalLMTask):
    """Trains a scalar reward head (`AutoModelForSequenceClassification`, `num_labels=1`) on a causal LM.

    Data: `PreferenceData` rows (`prompt`/`chosen`/`rejected`). The score of a conversation is the
    head's output at its last token. Validation and test log `loss`, `accuracy` (share of held-out pairs
    ranked right; 0.5 is chance) and `reward_margin`; test records are preference records. The head is
    new and always trains (`adapter.parts.head: full`); with LoRA the blocks get adapters.
    `mmtune export` writes the merged model with its tokenizer: a folder for `rewards: [{model: DIR}]`.

    Args:
        model, adapter, optimizer, monitor, chat_template, gradient_checkpointing, checkpoint_weights: as
            in `CausalLMTask`.
        margin: required score gap of the pairwise loss (0: plain Bradley-Terry).
        center_rewards: weight of a penalty on the squared mean score (TRL's `center_rewards_coefficient`),
            so scores stay near 0; 0 turns it off.
    """

    record_kind = "preference"
    baseline_from_export = False

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterSpec = AdapterSpec(method="lora"),
        optimizer: OptimizerSpec = OptimizerSpec(lr=1e-4, weight_decay=0.0),
        monitor: MonitorSpec = MonitorSpec(metric="val/accuracy", mode="max"),
        chat_template: Optional[str] = None,
        gradient_checkpointing: bool = False,
        checkpoint_weights: Literal["auto", "trainable", "full"] = "auto",
        margin: float = 0.0,
        center_rewards: float = 0.0,
    ) -> None:
        super().__init__(model, adapter, optimizer, monitor, chat_template, gradient_checkpointing, GenerationSpec(),
                         checkpoint_weights, None)
        if center_rewards < 0:
            raise ConfigError(f"center_rewards must not be negative, got {center_rewards}")
        self.hparams.pop("generation", None)
        self.hparams.pop("predictions_file", None)
        self.hparams.pop("chunked_loss", None)  # the loss is on the score head, never on the vocabulary
        self.hparams.update(margin=margin, center_rewards=center_rewards)
        self.margin, self.center_rewards = margin, center_rewards

    def _load(self, quantize: bool = True) -> torch.nn.Module:
        spec = self.model_spec
        if not quantize and spec.quantization != "none":
            from dataclasses import replace

            spec = replace(spec, quantization="none")
        return load_reward_model(spec, pad_token_id=self.tokenizer.pad_token_id)

    def configure_model(self) -> None:
        if self.net is not None:
            return
        if self.model_spec.quantization != "none":
            raise ConfigError("reward models do not support model.quantization yet; train them unquantized")
        net = self._load()
        net.train()
        if self.hparams.gradient_checkpointing:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.config.use_cache = False
        self.net, self.adapter_report = self._adapt(net)

    def _adapt(self, net: torch.nn.Module) -> tuple[torch.nn.Module, AdapterReport]:
        parts = reward_model_parts(net)
        frozen_default = "frozen" if self.adapter_spec.method != "none" else "full"
        defaults = {"language": "adapter", "embeddings": frozen_default, "head": "full"}
        return apply_adapter(net, self.adapter_spec, "hf", parts, {p: defaults[p] for p in parts})

    def forward(self, batch: dict) -> torch.Tensor:
        return sequence_scores(self.net, batch["input_ids"], batch["attention_mask"])

    def loss_terms(self, batch: dict, per_pair: bool = False) -> dict[str, torch.Tensor]:
        scores = self(batch)
        terms = pairwise_terms(scores, self.margin)
        if per_pair:
            return terms
        out = {name: value.mean() for name, value in terms.items()}
        if self.center_rewards:
            out["loss"] = out["loss"] + self.center_rewards * scores.mean() ** 2
        return out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["input_ids"]) // 2)
        return terms["loss"]

    def sample_records(self, batch: dict) -> list[SampleRecord]:
        terms = {name: value.tolist() for name, value in self.loss_terms(batch, per_pair=True).items()}
        pairs = len(batch["input_ids"]) // 2
        return [SampleRecord(id=batch["origins"][i], stats={name: values[i] for name, values in terms.items()},
                             meta=dict(batch["meta"][i])) for i in range(pairs)]

    def records_info(self) -> dict:
        return {**super().records_info(), "margin": self.margin}

    def _log_metrics(self, stage: str, records: list[SampleRecord]) -> None:
        pairs = max(len(records), 1)
        for name in ("loss", "reward_margin", "accuracy"):
            self.log(f"{stage}/{name}", torch.tensor(sum(r.stats[name] for r in records) / pairs),
                     prog_bar=name == "loss")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def predict_step(self, batch: dict, batch_idx: int):
        raise ConfigError("a reward model scores conversations; `mmtune predict` does not apply (export it and use "
                          "it as a GRPO reward, or test it on preference pairs with `mmtune test`)")

    def configure_optimizers(self) -> dict:
        raw = self._raw()
        return common.adamw_with_schedule(self.trainer, raw.named_parameters(), self.optimizer_spec,
                                          part_of=part_lookup(reward_model_parts(raw)), part_names=PARTS_DOC)

    def export(self, out_dir: str) -> Path:
        """The merged model (`AutoModelForSequenceClassification`, one label) with its tokenizer and chat
        template, as safetensors."""
        out = Path(out_dir)
        merged = merged_copy(self.net, False, lambda: self._adapt(self._load(quantize=False))[0])
        return save_merged_lm(merged, self.tokenizer, self.model_spec, out, "reward_model")
