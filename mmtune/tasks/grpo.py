"""Group relative policy optimization (GRPO) of causal language models on prompts with verifiable
rewards: a group of sampled completions per prompt, rewards from functions or a reward model,
group-normalised advantages, a clipped policy loss and a KL penalty to the reference model."""

from __future__ import annotations

import contextlib
import copy
from typing import Literal, Optional

import torch

from mmtune.adapters.folded import folded_adapters
from mmtune.errors import ConfigError
from mmtune.models.hf import stop_token_ids
from mmtune.rewards import RewardSpec
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec
from mmtune.tasks import common
from mmtune.tasks.grpo_rollout import (MERGEABLE, Rollout, VLLMSampler, build_rollout, completion_logps, sample_group,
                                      vllm_weights)
from mmtune.tasks.grpo_steps import GRPOSpec, GRPOSteps
from mmtune.tasks.sft import CausalLMTask, GenerationSpec

__all__ = ["GRPOSpec", "GRPOTask"]


@common.TASKS.register("grpo")
class GRPOTask(GRPOSteps, CausalLMTask):
    """GRPO against a frozen reference model, with rewards from functions and reward models.

    With an adapter the reference is the same network with its adapters switched off (no second copy,
    as in `DPOTask`); a full fine-tune keeps a frozen copy of the starting weights (`beta > 0`).
    Validation answers the validation prompts once each (greedy unless `generation.do_sample`) and logs
    `val/reward` (the weighted sum) and `val/reward/<name>`; the answers go to
    `<run>/samples/val_step_N.jsonl`.

    Args:
        model, adapter, optimizer, chat_template, gradient_checkpointing, generation, checkpoint_weights,
        predictions_file: as in `CausalLMTask`.
        monitor: best checkpoint and early stopping, on `val/reward` (max) by default.
        grpo: sampling and objective.
        rewards: what is rewarded, with weights (user functions are imported when training starts,
            never when a checkpoint is read).
    """

    baseline_from_export = False

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterSpec = AdapterSpec(method="lora"),
        optimizer: OptimizerSpec = OptimizerSpec(lr=1e-5, weight_decay=0.0, warmup=0.0),
        monitor: MonitorSpec = MonitorSpec(metric="val/reward", mode="max"),
        chat_template: Optional[str] = None,
        gradient_checkpointing: bool = False,
        generation: GenerationSpec = GenerationSpec(),
        checkpoint_weights: Literal["auto", "trainable", "full"] = "auto",
        predictions_file: Optional[str] = None,
        grpo: GRPOSpec = GRPOSpec(),
        rewards: list[RewardSpec] = [],  # noqa: B006  (jsonargparse needs a plain default)
    ) -> None:
        super().__init__(model, adapter, optimizer, monitor, chat_template, gradient_checkpointing, generation,
                         checkpoint_weights, predictions_file)
        # Its loss is per-token log-ratios of sampled completions, not the SFT token loss: no chunked switch.
        self.hparams.pop("chunked_loss", None)
        self._init_grpo(grpo, rewards, "GRPOTask")
        if self.grpo_spec.backend == "vllm" and self.adapter_spec.method not in MERGEABLE:
            raise ConfigError(f"grpo.backend: vllm runs merged weights; adapter.method {self.adapter_spec.method!r} "
                              f"does not merge (use one of {', '.join(MERGEABLE)}, or backend: generate)")
        self._vllm: Optional[VLLMSampler] = None

    def configure_model(self) -> None:
        if self.net is not None:
            return
        super().configure_model()
        if self.adapter_spec.method == "none" and self.grpo_spec.beta > 0:
            # As in DPOTask: a frozen copy outside the module tree (checkpoints and optimizer never see it).
            object.__setattr__(self, "_ref", copy.deepcopy(self.net).eval().requires_grad_(False))

    # ---- rollout ---------------------------------------------------------------------------------------
    def _sample(self, batch: dict, group: int, do_sample: bool, temperature: float, top_p: float) -> torch.Tensor:
        spec, stops = self.grpo_spec, stop_token_ids(self.tokenizer)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if spec.backend == "vllm" and do_sample:
            return self._sample_vllm(ids, mask, group)
        return sample_group(self.net, ids, mask, group, spec.max_new_tokens, stops, self.tokenizer.pad_token_id,
                            temperature, top_p, spec.top_k, do_sample, fold_adapters=spec.fold_adapters)

    def _sample_vllm(self, ids: torch.Tensor, mask: torch.Tensor, group: int) -> torch.Tensor:
        spec = self.grpo_spec
        if self._vllm is None:
            dtype = str(next(self.net.parameters()).dtype).removeprefix("torch.")
            self._vllm = VLLMSampler(self.model_spec.name, dtype=dtype, seed=torch.initial_seed() % 2**31)
        with contextlib.ExitStack() as stack:
            # The adapters folded into temporary weights (the trained ones come back exactly); peft's
            # in-place merge only where folding does not apply (DoRA, a quantized base).
            if not stack.enter_context(folded_adapters(self.net)) and self.adapter_spec.method != "none":
                self.net.merge_adapter()
                stack.callback(self.net.unmerge_adapter)
            self._vllm.load_weights(vllm_weights(self._raw()))
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        outs = self._vllm.sample(prompts, group, spec.max_new_tokens, spec.temperature, spec.top_p, spec.top_k)
        width = max(len(o) for o in outs)
        comp = torch.full((len(outs), width), self.tokenizer.pad_token_id, dtype=torch.long, device=ids.device)
        for r, o in enumerate(outs):
            comp[r, :len(o)] = torch.tensor(o, dtype=torch.long)
        return torch.cat([ids.repeat_interleave(group, dim=0), comp], dim=1)

    def _generate_rollout(self, batch: dict, group: int, do_sample: bool, temperature: float, top_p: float) -> Rollout:
        full = self._sample(batch, group, do_sample, temperature, top_p)
        ids, mask = batch["input_ids"].to(full.device), batch["attention_mask"].to(full.device)
        return build_rollout(ids.repeat_interleave(group, dim=0), mask.repeat_interleave(group, dim=0),
                             full[:, ids.shape[1]:], stop_token_ids(self.tokenizer), self.tokenizer)

    def _policy_logps(self, net: torch.nn.Module, rows: dict, prompt_len: int) -> torch.Tensor:
        return completion_logps(net, rows["input_ids"], rows["attention_mask"], prompt_len, self.grpo_spec.temperature)
