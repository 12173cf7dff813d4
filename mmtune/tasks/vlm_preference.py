"""Preference tuning of vision-language models (DPO and the other paired losses) on image + prompt +
chosen/rejected rows.

Its own small task rather than an image column on the text preference task: a VLM is loaded, adapted
(vision tower, projector, language parts), encoded (image tokens, family-specific inputs such as
Qwen2-VL's grid) and exported through `VisionLanguageTask`, while the text task builds on the causal-LM
task's tokenizer and chat template; one class serving both would branch on the model kind in every
step. Subclassing the VLM task keeps all of that, and the losses are the same pure functions as the
text task's (`mmtune.losses.preference`). The reference is the same network with its adapters
switched off (a frozen copy for a full fine-tune); ORPO and SimPO need none.
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

import torch

from mmtune.errors import ConfigError
from mmtune.losses.preference import PREFERENCE_LOSSES, PreferenceSpec, SequenceLogps, batch_means, sequence_logps
from mmtune.metrics.records import SampleRecord
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec, as_spec, spec_to_dict
from mmtune.tasks import common
from mmtune.tasks.vlm import VisionLanguageTask
from mmtune.tasks.vlm_decoding import DecodingSpec


@common.TASKS.register("vision_preference")
class VisionPreferenceTask(VisionLanguageTask):
    """DPO, IPO, ORPO or SimPO of any decoder-only image-text-to-text model (LLaVA, Idefics3/SmolVLM,
    Qwen2-VL, Qwen2.5-VL, PaliGemma, ...) on `VisionPreferenceData`.

    Args:
        model, adapter, optimizer, monitor, decoding, chat_template, encoding, gradient_checkpointing,
        checkpoint_weights, predictions_file: as in `VisionLanguageTask`.
        preference: the loss and its hyperparameters (`kto` needs unpaired rows, which this task does not read).
    """

    baseline_from_export = False  # rewards are measured against the base: see DPOTask
    record_kind = "preference"

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterSpec = AdapterSpec(method="lora"),
        optimizer: OptimizerSpec = OptimizerSpec(lr=5e-5, weight_decay=0.0),
        monitor: MonitorSpec = MonitorSpec(),
        decoding: DecodingSpec = DecodingSpec(),
        chat_template: Optional[str] = None,
        encoding: Literal["auto", "chat", "plain", "prefix_suffix", "encoder_decoder"] = "auto",
        gradient_checkpointing: bool = False,
        checkpoint_weights: Literal["auto", "trainable", "full"] = "auto",
        predictions_file: Optional[str] = None,
        preference: PreferenceSpec = PreferenceSpec(),
    ) -> None:
        super().__init__(model, adapter, optimizer, monitor, decoding, chat_template, encoding, gradient_checkpointing,
                         checkpoint_weights, predictions_file)
        self.preference_spec = as_spec(PreferenceSpec, preference)
        self.preference_loss = PREFERENCE_LOSSES.get(self.preference_spec.loss)
        if self.preference_loss.unpaired:
            raise ConfigError("preference.loss 'kto' reads unpaired rows; vision-language preference data is paired "
                              "(image, prompt, chosen, rejected): use dpo, ipo, orpo or simpo")
        if self.preference_loss.needs_reference and self.adapter_spec.rewrites_base:
            raise ConfigError(f"adapter.init {self.adapter_spec.init!r} rewrites the base weights, so the base with "
                              "adapters off is no longer the reference; use init default or gaussian, or orpo/simpo")
        self.hparams["preference"] = spec_to_dict(self.preference_spec)
        self._ref: Optional[torch.nn.Module] = None
        self._records: list[SampleRecord] = []

    def configure_model(self) -> None:
        if self.net is not None:
            return
        super().configure_model()
        if self.adapter_spec.method == "none" and self.preference_loss.needs_reference:
            # kept out of the module tree: checkpoints and the optimizer never see the frozen copy
            object.__setattr__(self, "_ref", copy.deepcopy(self.net).eval().requires_grad_(False))

    def _reference_logps(self, batch: dict, shift: bool) -> torch.Tensor:
        with torch.no_grad():
            if self._ref is None:
                with self.net.disable_adapter():
                    logits = self._logits(batch)[0]
            elif shift:
                logits = self._ref.to(self.device)(**self._inputs(batch["inputs"]), use_cache=False).logits
            else:
                raise ConfigError("a full fine-tune (adapter.method: none) of an encoder-decoder family needs a reference "
                                  "copy this task does not build; use an adapter or a reference-free loss (orpo, simpo)")
        return sequence_logps(logits, batch["labels"], shift)[0]

    def loss_terms(self, batch: dict, per_pair: bool = False) -> dict[str, torch.Tensor]:
        """The loss's terms for a batch of [chosen..., rejected...] rows: batch means, or `[pairs]` tensors."""
        logits, shift = self._logits(batch)
        policy, counts = sequence_logps(logits, batch["labels"], shift)
        reference = self._reference_logps(batch, shift) if self.preference_loss.needs_reference else None
        terms = self.preference_loss.compute(SequenceLogps(policy, counts, reference), self.preference_spec)
        return terms if per_pair else batch_means(terms)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch)
        for name, value in terms.items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(batch["origins"]))
        return terms["loss"] + self._unused_trainable_guard()

    def _eval_step(self, batch: dict, generate: bool) -> None:
        terms = {name: value.tolist() for name, value in self.loss_terms(batch, per_pair=True).items()}
        self._records += [SampleRecord(id=sid, stats={name: values[i] for name, values in terms.items()},
                                       meta=dict(batch["meta"][i])) for i, sid in enumerate(batch["origins"])]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, False)  # no generation: the metric is the preference, not the text

    def on_validation_epoch_start(self) -> None:
        pass

    def records_info(self) -> dict:
        return {"model": self.model_spec.name, "adapter": self.adapter_spec.method, "beta": self.preference_spec.beta,
                "loss": self.preference_spec.loss}

    def _finish(self, stage: str) -> None:
        mine, self._records = self._records, []
        if stage == "test":
            records = common.publish_records(self, stage, self.record_kind, mine, self.records_info()).records
        else:
            records = common.gather_records(mine)
        count = max(len(records), 1)
        for name in (records[0].stats if records else {"loss": 0}):
            self.log(f"{stage}/{name}", torch.tensor(sum(r.stats[name] for r in records) / count),
                     prog_bar=name == "loss", sync_dist=False)

    def predict_step(self, batch: dict, batch_idx: int):
        raise ConfigError("mmtune predict generates with VisionLanguageTask: export this model and point a "
                          "VisionLanguageTask config (model.name) at the export to generate answers")
