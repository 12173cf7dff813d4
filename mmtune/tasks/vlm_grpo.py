"""GRPO of vision-language models on image + question prompts with verifiable rewards.

The VLM plumbing (loading, adapters per part, processor, encoding, checkpoints, export) is
`VisionLanguageTask`'s, as for `VisionPreferenceTask`; the GRPO loop (rewards, advantages, clipped
loss, KL to the base with adapters off, logging, validation samples) is `GRPOSteps`, shared with the
text `GRPOTask`. What is particular here is the rollout: each prompt is encoded once per sampled
completion by the processor (pixel inputs repeated per completion in the layout each family wants),
generated from, and the same inputs, extended over the completion, feed the log-probability passes.
"""

from __future__ import annotations

import copy
from typing import Literal, Optional

import torch

from mmtune.data.vl_encoding import ChatEncoding
from mmtune.errors import ConfigError
from mmtune.rewards import RewardSpec
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec
from mmtune.tasks import common
from mmtune.tasks.grpo_rollout import Rollout, build_rollout, completion_logps, generate_completions
from mmtune.tasks.grpo_steps import GRPOSpec, GRPOSteps
from mmtune.tasks.vlm import VisionLanguageTask
from mmtune.tasks.vlm_decoding import DecodingSpec

# Decoder-only families with a chat template (the `chat` encoding): the prompt is continued on the right.
GRPO_FAMILIES = "llava, idefics3 (SmolVLM), qwen2_vl, qwen2_5_vl and other chat-template decoder-only VLMs"

_NOT_CHAT = {"PlainEncoding": "has no chat template (set chat_template and encoding: chat to give it one)",
             "PrefixSuffixEncoding": "is a prefix-LM family (PaliGemma: prefix + suffix inputs)",
             "EncoderDecoderEncoding": "is an encoder-decoder (the answer is the decoder's, not a continuation)"}


@common.TASKS.register("vision_grpo")
class VisionGRPOTask(GRPOSteps, VisionLanguageTask):
    """GRPO of a decoder-only image-text-to-text model with a chat template on `VisionPromptData`.

    With an adapter the reference is the same network with its adapters switched off; a full
    fine-tune keeps a frozen copy (`beta > 0`). Validation answers each validation prompt once (greedy
    unless `decoding.do_sample`), logs `val/reward` and `val/reward/<name>` and writes the answers to
    `<run>/samples/val_step_N.jsonl`.

    Args:
        model, adapter, optimizer, chat_template, gradient_checkpointing, checkpoint_weights: as in
            `VisionLanguageTask` (parts: vision frozen, projector fully trained, language with the
            adapter by default).
        monitor: best checkpoint and early stopping, on `val/reward` (max) by default.
        encoding: `auto`, or `chat` to use `chat_template` on a model without one.
        decoding: validation answers (`do_sample`, `temperature`, `top_p`); the rollout samples with `grpo`.
        grpo: sampling and objective, as in `GRPOTask` (`backend: generate` only; `micro_batch_size`
            needs pixel inputs with one row per completion, which Qwen2-VL's packed patches are not).
        rewards: what is rewarded, with weights; the rows' `answer` column is the sample's answer.
    """

    baseline_from_export = False

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterSpec = AdapterSpec(method="lora"),
        optimizer: OptimizerSpec = OptimizerSpec(lr=1e-5, weight_decay=0.0, warmup=0.0),
        monitor: MonitorSpec = MonitorSpec(metric="val/reward", mode="max"),
        decoding: DecodingSpec = DecodingSpec(),
        chat_template: Optional[str] = None,
        encoding: Literal["auto", "chat"] = "auto",
        gradient_checkpointing: bool = False,
        checkpoint_weights: Literal["auto", "trainable", "full"] = "auto",
        grpo: GRPOSpec = GRPOSpec(),
        rewards: list[RewardSpec] = [],  # noqa: B006  (jsonargparse needs a plain default)
    ) -> None:
        super().__init__(model, adapter, optimizer, monitor, decoding, chat_template, encoding, gradient_checkpointing,
                         checkpoint_weights, None)
        for key in ("chunked_loss", "predictions_file"):  # not arguments of this task
            self.hparams.pop(key, None)
        self._init_grpo(grpo, rewards, "VisionGRPOTask")
        if self.grpo_spec.backend != "generate":
            raise ConfigError("VisionGRPOTask samples with grpo.backend: generate (vLLM is wired for text GRPOTask only)")
        self.encoding  # noqa: B018  (an encoder-decoder or template-less family fails here, at construction)

    @property
    def encoding(self):
        if self._encoding is None:
            try:
                encoding = super().encoding
            except ConfigError as err:
                raise ConfigError(f"VisionGRPOTask works with {GRPO_FAMILIES}; {self.model_spec.name}: {err}") from err
            if not isinstance(encoding, ChatEncoding):
                why = _NOT_CHAT.get(type(encoding).__name__, "does not take chat prompts")
                raise ConfigError(f"VisionGRPOTask works with {GRPO_FAMILIES}; {self.model_spec.name} {why}")
        return self._encoding

    @property
    def generation_spec(self) -> DecodingSpec:
        """The validation answers' settings (`GRPOSteps` reads `do_sample`, `temperature`, `top_p`)."""
        return self.decoding_spec

    def configure_model(self) -> None:
        if self.net is not None:
            return
        super().configure_model()
        if self.adapter_spec.method == "none" and self.grpo_spec.beta > 0:
            # kept out of the module tree: checkpoints and the optimizer never see the frozen copy
            object.__setattr__(self, "_ref", copy.deepcopy(self.net).eval().requires_grad_(False))

    # ---- rollout ---------------------------------------------------------------------------------------
    def prompt_inputs(self, batch: dict, group: int) -> dict:
        """The processor's inputs for every prompt of `batch` repeated `group` times (left padded)."""
        items = [item for item in batch["items"] for _ in range(group)]
        images = [image for image in batch["images"] for _ in range(group)]
        inputs = self.encoding.prompt_batch(items, images)
        return self._inputs({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()})

    def _generate_rollout(self, batch: dict, group: int, do_sample: bool, temperature: float, top_p: float) -> Rollout:
        spec, encoding = self.grpo_spec, self.encoding
        inputs = self.prompt_inputs(batch, group)
        prompt_ids, prompt_mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        stops = encoding.stop_ids or [self.processor.tokenizer.eos_token_id]
        # a copy of the ids: some families' generate edits them in place
        full = generate_completions(self.net, {"input_ids": prompt_ids.clone(), "attention_mask": prompt_mask, **inputs},
                                    spec.max_new_tokens, stops, self.processor.tokenizer.pad_token_id, temperature,
                                    top_p, spec.top_k, do_sample, suppress_ids=encoding.image_ids,
                                    fold_adapters=spec.fold_adapters)
        return build_rollout(prompt_ids, prompt_mask, full[:, prompt_ids.shape[1]:], stops, self.processor.tokenizer,
                             inputs)

    def _policy_logps(self, net: torch.nn.Module, rows: dict, prompt_len: int) -> torch.Tensor:
        # Qwen2-VL-style models derive multimodal rotary positions from the ids and the image grid
        own_positions = hasattr(getattr(self._raw(), "model", None), "get_rope_index")
        return completion_logps(net, rows["input_ids"], rows["attention_mask"], prompt_len, self.grpo_spec.temperature,
                                rows["model_inputs"], positions=not own_positions)

    def loss_terms(self, rows: dict, prompt_len: int) -> dict[str, torch.Tensor]:
        terms = super().loss_terms(rows, prompt_len)
        terms["loss"] = terms["loss"] + self._unused_trainable_guard()  # DDP: every trainable weight gets a gradient
        return terms

    # ---- evaluation -------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        pass  # every validation prompt is answered (no loss-only rows as in VisionLanguageTask)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def predict_step(self, batch: dict, batch_idx: int):
        raise ConfigError("mmtune predict generates with VisionLanguageTask: export this model and point a "
                          "VisionLanguageTask config (model.name) at the export to generate answers")
