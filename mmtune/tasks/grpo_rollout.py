"""Sampling a group of completions per prompt for GRPO, and the token log-probabilities of them.

Generation runs the policy in eval mode (no dropout; gradient checkpointing only acts in training
mode) with the KV cache, under `torch.no_grad`; the randomness comes from the global generator,
which `mmtune.callbacks.StepSeed` reseeds before every training step, so a resumed run samples what
the uninterrupted one did.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from mmtune.adapters.folded import folded_adapters
from mmtune.errors import ConfigError
from mmtune.losses.grpo import token_logps


@dataclass
class Rollout:
    """A generation batch: prompts repeated G times, their completions, rewards and advantages.

    Attributes:
        input_ids, attention_mask: `[N, P + L]` prompt (left-padded) then completion (0 after the stop).
        prompt_len: P.
        completion_mask: `[N, L]` float, 1 up to and including the stop token.
        texts: decoded completions.
        rewards: `[N]` weighted sum; `scores`: each reward function's `[N]` scores.
        advantages: `[N]`.
        old_logps: `[N, L]` of the generating policy (only with `num_iterations > 1`).
        ref_logps: `[N, L]` of the reference (only with `beta > 0`).
        model_inputs: the other inputs of the forward pass, one row per completion (a VLM's pixel
            values, image grids, ...; `[N, P]` token-type rows already extended over the completion).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    completion_mask: torch.Tensor
    texts: list[str]
    truncated: torch.Tensor
    rewards: torch.Tensor = None
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    advantages: torch.Tensor = None
    old_logps: Optional[torch.Tensor] = None
    ref_logps: Optional[torch.Tensor] = None
    model_inputs: dict = field(default_factory=dict)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]

    def rows(self, index: slice) -> dict[str, torch.Tensor]:
        """The tensors of some rows, for a micro-batch."""
        out = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
               "completion_mask": self.completion_mask[index], "advantages": self.advantages[index]}
        for name in ("old_logps", "ref_logps"):
            value = getattr(self, name)
            out[name] = value[index] if value is not None else None
        out["model_inputs"] = rows_of(self.model_inputs, index, len(self.input_ids))
        return out


def rows_of(inputs: dict, index: slice, rows: int) -> dict:
    """The rows `index` of model inputs whose tensors have one row per completion. Inputs packed across
    rows (Qwen2-VL's pixel patches of every image in one tensor) cannot be cut by row: an error for a
    part of the batch, the whole batch as is."""
    if index == slice(None) or not inputs:
        return inputs
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() and value.shape[0] != rows:
            raise ConfigError(f"grpo.micro_batch_size: the model input {key!r} packs all rows into one tensor "
                              f"(shape {tuple(value.shape)} for {rows} completions) and cannot be cut by row; "
                              "set grpo.micro_batch_size: 0 for this model")
        out[key] = value[index] if torch.is_tensor(value) and value.dim() else value
    return out


def over_completions(inputs: dict, rows: int, prompt_len: int, total_len: int) -> dict:
    """Model inputs of the prompts extended to prompt + completion: per-token rows `[N, P]` (Qwen2-VL's
    `mm_token_type_ids`) get zeros (text) over the completion, as `generate` extends them."""
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.dim() == 2 and tuple(value.shape) == (rows, prompt_len):
            value = torch.cat([value, value.new_zeros(rows, total_len - prompt_len)], dim=1)
        out[key] = value
    return out


def build_rollout(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
                  stop_ids: Sequence[int], tokenizer, model_inputs: Optional[dict] = None) -> Rollout:
    """A rollout (without rewards yet) from left-padded prompts `[N, P]`, one row per completion, and
    the generated tokens `[N, L]`: the completion mask ends at the first stop token, the texts are
    decoded from the masked tokens only."""
    mask, truncated = completion_mask(completions, stop_ids)
    attention = torch.cat([prompt_mask.to(completions.device), mask.long()], dim=1)
    pad = tokenizer.pad_token_id
    texts = tokenizer.batch_decode(completions * mask.long() + pad * (1 - mask.long()), skip_special_tokens=True)
    ids = torch.cat([prompt_ids.to(completions.device), completions], dim=1)
    extra = over_completions(model_inputs or {}, len(ids), prompt_ids.shape[1], ids.shape[1])
    return Rollout(ids, attention, prompt_ids.shape[1], mask, texts, truncated, model_inputs=extra)


def completion_mask(completion_ids: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask `[N, L]`: 1 up to and including the first stop token, truncated `[N]`: no stop token)."""
    is_stop = torch.isin(completion_ids, torch.tensor(list(stop_ids), device=completion_ids.device))
    has_stop = is_stop.any(dim=1)
    length = completion_ids.shape[1]
    first = torch.where(has_stop, is_stop.int().argmax(dim=1), torch.full_like(has_stop, length, dtype=torch.long))
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first.unsqueeze(1)).float(), ~has_stop


@torch.no_grad()
def sample_group(net: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int,
                 max_new_tokens: int, stop_ids: Sequence[int], pad_id: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, do_sample: bool = True, fold_adapters: bool = True) -> torch.Tensor:
    """`[prompts * group_size, P + L]` ids: each prompt repeated `group_size` times and continued by
    `generate` (sampling, eval mode, KV cache)."""
    ids = prompt_ids.repeat_interleave(group_size, dim=0)
    mask = prompt_mask.repeat_interleave(group_size, dim=0)
    return generate_completions(net, {"input_ids": ids, "attention_mask": mask}, max_new_tokens, stop_ids, pad_id,
                                temperature, top_p, top_k, do_sample, fold_adapters=fold_adapters)


@torch.no_grad()
def generate_completions(net: torch.nn.Module, inputs: dict, max_new_tokens: int, stop_ids: Sequence[int],
                         pad_id: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                         do_sample: bool = True, suppress_ids: Sequence[int] = (), fold_adapters: bool = True) -> torch.Tensor:
    """`[N, P + L]` ids: the model inputs (one row per completion: `input_ids`, `attention_mask` and
    whatever else the model reads, e.g. a VLM's pixel values) continued by `generate` (eval mode, KV cache).

    `suppress_ids` are never generated: a VLM's image placeholder token in a completion would make the
    next forward pass look for image features that do not exist. `fold_adapters`: sample with LoRA/VeRA
    folded into a temporary copy of the adapted weights (`mmtune.adapters.folded`): one matmul per layer
    instead of three at every decoding step."""
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {"do_sample": False}
    if suppress_ids:
        sampling["suppress_tokens"] = sorted(suppress_ids)
    was_training = net.training
    net.eval()
    try:
        with folded_adapters(net, fold_adapters):
            return net.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids),
                                pad_token_id=pad_id, use_cache=True, **sampling)
    finally:
        net.train(was_training)


def completion_logps(net: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                     temperature: float = 1.0, model_inputs: Optional[dict] = None,
                     positions: bool = True) -> torch.Tensor:
    """`[N, L]` log-probabilities of the completion tokens; only the logits that predict completion
    tokens are computed.

    Args:
        model_inputs: the forward's other inputs, one row per completion (a VLM's pixel values, ...).
        positions: pass positions that count attended tokens only, as generation does with left
            padding; False for models that derive their own (Qwen2-VL's multimodal rotary positions).
    """
    extra = dict(model_inputs or {})
    if positions:
        extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    keep = input_ids.shape[1] - prompt_len + 1
    logits = net(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep,
                 **extra).logits[:, :-1]
    return token_logps(logits, input_ids[:, prompt_len:], temperature)


def check_backend(backend: str) -> None:
    """`vllm` needs vLLM installed and a CUDA GPU; the error says which is missing."""
    if backend == "generate":
        return
    if backend != "vllm":
        raise ConfigError(f"grpo.backend must be 'generate' or 'vllm', got {backend!r}")
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError("grpo.backend: vllm needs the vllm package (pip install vllm); use backend: generate")
    if not torch.cuda.is_available():
        raise ConfigError("grpo.backend: vllm needs a CUDA GPU; use backend: generate on this machine")


class VLLMSampler:
    """Samples with a colocated vLLM engine, the policy's current weights loaded before each generation
    (adapters merged first), as TRL's colocate mode does. Only built where vLLM and a GPU are present;
    the CPU suite runs it against a recording engine (tests/test_grpo.py), not a real one.

    Args:
        model_path: the base model folder (vLLM reads its config and tokenizer).
        dtype: the policy's dtype, so the pushed weights need no cast.
        seed: vLLM's sampling seed.
        gpu_memory_utilization: the share of GPU memory vLLM may take.
    """

    def __init__(self, model_path: str, dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.3) -> None:
        from vllm import LLM

        self.llm = LLM(model=model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=True)

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(list(named_tensors.items()))
        # The prefix cache holds prompt keys and values of the old weights: drop them, or the next
        # generation would attend to what the previous policy computed.
        self.llm.reset_prefix_cache()

    def sample(self, prompt_ids: list[list[int]], group_size: int, max_new_tokens: int, temperature: float,
               top_p: float, top_k: int) -> list[list[int]]:
        from vllm import SamplingParams

        params = SamplingParams(n=group_size, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k if top_k > 0 else -1)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params, use_tqdm=False)
        return [list(c.token_ids) for out in outputs for c in out.outputs]


MERGEABLE = ("none", "lora", "vera")  # methods whose weights fold into the base layers vLLM runs


def vllm_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under the names vLLM's model expects, once the adapters are merged into
    them: peft's `.base_layer` and `modules_to_save.default.` dropped, the adapters' own tensors and the
    original copies of trained modules left out (TRL's `_iter_named_params` does the same)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "vera_" in name or "original_module" in name:
            continue
        out[name.replace(".base_layer", "").replace("modules_to_save.default.", "")] = tensor
    return out
