"""Supervised fine-tuning of causal language models (instruction, chat, continued pretraining)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from mmtune.adapters import (AdapterReport, apply_adapter, check_quantized_training, lora_plus_scale, merged_copy,
                             optimizer_parameters, part_lookup)
from mmtune.adapters.unmerged import export_unmerged
from mmtune.data.text_batches import PromptCollator
from mmtune.data.text_reading import Conversation, prompt_conversation
from mmtune.errors import ConfigError
from mmtune.files import atomic_write
from mmtune.losses.chunked import linear_token_loss, linear_token_loss_per_row
from mmtune.losses.tokens import global_token_mean, token_loss, token_loss_per_row
from mmtune.metrics.records import SampleRecord
from mmtune.models.hf import (
    decoder_layers,
    lm_parts,
    load_causal_lm,
    load_tokenizer,
    resolve_hf_ref,
    save_pretrained_safetensors,
    stop_token_ids,
    vocabulary_fingerprint,
)
from mmtune.models.generation import generation_mode
from mmtune.models.lm_head import SplitHead, hidden_states, split_head
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec, as_spec, spec_to_dict
from mmtune.tasks import common

PARTS_DOC = {"language": "the transformer blocks and norms", "embeddings": "input token embeddings",
             "head": "the output projection (lm_head)"}
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass
class GenerationSpec:
    """Generations for fixed prompts at every validation, written to `<run>/samples/step_N.jsonl`,
    and the settings `mmtune predict` generates with.

    Args:
        prompts: user messages (or lists of turns) to answer at each validation; empty: none.
        max_new_tokens: longest generation.
        do_sample: sample (with `temperature`, `top_p`) instead of greedy decoding.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
    """

    prompts: list = field(default_factory=list)
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@common.TASKS.register("causal_lm")
class CausalLMTask(common.RunHooks, L.LightningModule):
    """Fine-tunes any `AutoModelForCausalLM`: full, LoRA, DoRA, QLoRA (4-bit NF4 base + LoRA).

    Args:
        model: a hub id, a local `save_pretrained` directory, or a .gguf file; `quantization: nf4`
            with `adapter.method: lora` is QLoRA.
        adapter: adapters and per-part freezing; parts are `language` (blocks), `embeddings`, `head`.
            With an adapter method, embeddings and head default to frozen; without, all train.
        optimizer: AdamW settings and schedule.
        monitor: best-checkpoint and early-stopping metric (`val/loss` by default).
        chat_template: None uses the tokenizer's own template (built-in ChatML when it has none); a
            built-in name (`chatml`) replaces it. The template is exported with the model.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
        generation: fixed prompts generated at each validation, and generation settings for predict.
        checkpoint_weights: `trainable` (adapters and trained parts only), `full`, or `auto`.
        predictions_file: where `predict` writes its JSONL (default: `predictions.jsonl` in the run directory).
        chunked_loss: compute the token loss from the final hidden states in chunks of tokens, only at
            labelled positions, so the full batch x length x vocabulary logits never exist
            (`mmtune.losses.chunked`; same loss and gradients). Models whose logits are not a plain
            projection (soft-capping, a LoRA-adapted lm_head) and FSDP2 runs use the plain loss.
    """

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterSpec = AdapterSpec(method="lora"),
        optimizer: OptimizerSpec = OptimizerSpec(lr=2e-4, weight_decay=0.0),
        monitor: MonitorSpec = MonitorSpec(),
        chat_template: Optional[str] = None,
        gradient_checkpointing: bool = False,
        generation: GenerationSpec = GenerationSpec(),
        checkpoint_weights: Literal["auto", "trainable", "full"] = "auto",
        predictions_file: Optional[str] = None,
        chunked_loss: bool = True,
    ) -> None:
        super().__init__()
        self.model_spec = as_spec(ModelSpec, model)
        self.adapter_spec = as_spec(AdapterSpec, adapter)
        self.optimizer_spec = as_spec(OptimizerSpec, optimizer)
        self.monitor_spec = as_spec(MonitorSpec, monitor)
        self.generation_spec = as_spec(GenerationSpec, generation)
        resolve_hf_ref(self.model_spec)  # fail at construction on a missing file
        check_quantized_training(self.model_spec, self.adapter_spec)
        self.save_hyperparameters({
            "model": spec_to_dict(self.model_spec), "adapter": spec_to_dict(self.adapter_spec),
            "optimizer": spec_to_dict(self.optimizer_spec), "monitor": spec_to_dict(self.monitor_spec),
            "chat_template": chat_template, "gradient_checkpointing": gradient_checkpointing,
            "generation": spec_to_dict(self.generation_spec), "checkpoint_weights": checkpoint_weights,
            "predictions_file": predictions_file, "chunked_loss": chunked_loss,
        })
        self.tokenizer = load_tokenizer(self.model_spec, chat_template)
        self.net: Optional[torch.nn.Module] = None
        self.adapter_report: Optional[AdapterReport] = None
        self._eval_records: list[SampleRecord] = []  # this process's samples of the current evaluation
        self._vocabulary: Optional[str] = None
        self._predictions: list[tuple[int, str]] = []
        self._packing = False
        self._split: Optional[tuple] = None  # (net, its SplitHead or None) for the chunked loss, found on first use

    # ---- build -------------------------------------------------------------------------------------
    def _trainable_only(self) -> bool:
        return common.saves_trainable_only(self.hparams.checkpoint_weights, self.adapter_spec, self.model_spec.pretrained)

    def setup(self, stage: str) -> None:
        """Gives the data module the tokenizer (with the chosen chat template)."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and hasattr(dm, "connect"):
            self.connect_data(dm)
            self._packing = bool(getattr(dm, "packing", False)) and stage == "fit"
            self.check_packing_support(self._packing)  # the model may already be built (validate, then fit)

    def connect_data(self, dm) -> None:
        """Hands the data module the tokenizer (a seam: the preference task also says how to read rows)."""
        dm.connect(self.tokenizer)

    def check_packing_support(self, packing: bool) -> None:
        """Packed rows rely on transformers turning restarting position ids into per-sample attention;
        an attention implementation that does not would let samples see each other."""
        if not packing:
            return
        if not self.adapter_spec.mergeable:
            raise ConfigError(f"data.packing does not work with adapter.method {self.adapter_spec.method!r}: its "
                              "virtual tokens would be shared by every sample of a packed row; turn packing off")
        if self.net is None:
            return
        impl = self._raw().config._attn_implementation
        if impl not in PACKING_ATTENTION:
            raise ConfigError(f"data.packing needs an attention implementation that keeps packed samples apart "
                              f"({', '.join(PACKING_ATTENTION)}); the model uses {impl!r}: set "
                              "model.kwargs.attn_implementation or turn packing off")

    def configure_model(self) -> None:
        if self.net is not None:
            return
        net = load_causal_lm(self.model_spec)
        net.train()  # from_pretrained returns eval mode; Lightning switches modes only at the top
        gc = bool(self.hparams.gradient_checkpointing)
        if self.model_spec.quantization != "none":
            from peft import prepare_model_for_kbit_training

            # Casts norms to float32 and, with checkpointing, makes inputs require grad for the adapters.
            net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=gc,
                                                  gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gc:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.config.use_cache = False  # caches are for generation; training would only hold them in memory
        self.net, self.adapter_report = self._adapt(net)
        rank_zero_info(f"[mmtune] {self.model_spec.name}: {self.adapter_report.summary()}")
        self.check_packing_support(self._packing)
        if self._device_mesh is not None:  # ModelParallelStrategy (FSDP2)
            raw = self._raw()
            # where peft put the base model: `base_model.model.` under LoRA, `base_model.` under prompt learning
            at = next(name for name, module in self.net.named_modules() if module is raw)
            prefix = f"{at}." if at else ""
            blocks = [self.net.get_submodule(prefix + b) for b in decoder_layers(raw)]
            common.shard_fsdp2(self.net, self.device_mesh, blocks)

    def _adapt(self, net: torch.nn.Module) -> tuple[torch.nn.Module, AdapterReport]:
        parts = lm_parts(net)
        # With adapters, embeddings and head stay frozen (as in peft's all-linear); a full fine-tune trains all.
        frozen_default = "frozen" if self.adapter_spec.method != "none" else "full"
        defaults = {"language": "adapter", "embeddings": frozen_default, "head": frozen_default}
        return apply_adapter(net, self.adapter_spec, "hf", parts, {p: defaults[p] for p in parts},
                             prompt_learning="CAUSAL_LM")

    def _raw(self) -> torch.nn.Module:
        return self.net.get_base_model() if self.adapter_spec.method != "none" else self.net

    # ---- steps -------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        # No cache: besides wasting memory, a cache makes transformers skip the packed-sample detection
        # that keeps attention inside each sample of a packed row.
        if not self.adapter_spec.mergeable:
            inputs.pop("position_ids", None)  # peft's virtual tokens shift positions itself (and refuses them)
        # Prompt tuning puts its virtual tokens in front of the outputs: keep the real tokens' positions.
        return self.net(**inputs, use_cache=False).logits[:, -batch["input_ids"].shape[1]:]

    def _split_head(self) -> Optional[SplitHead]:
        """Where the chunked loss applies: the model's body and plain lm_head (None: plain loss)."""
        if not self.hparams.get("chunked_loss", True) or self._device_mesh is not None:
            return None  # FSDP2 gathers the head's weight only inside the root module's forward
        if self._split is None or self._split[0] is not self.net:
            self._split = (self.net, split_head(self.net))
        return self._split[1]

    def loss_sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token cross entropy over the batch's labelled tokens, and their count."""
        split = self._split_head()
        if split is None:
            return token_loss(self(batch), batch["labels"])
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return linear_token_loss(hidden_states(split, inputs), split.head.weight, split.head.bias, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, mean = global_token_mean(*self.loss_sums(batch))
        self.log("train/loss", mean, prog_bar=True, batch_size=len(batch["input_ids"]))
        self.log("train/tokens", batch["num_tokens"].float(), reduce_fx="sum", batch_size=1)
        return loss

    # What `mmtune test` hands out per sample (`mmtune.metrics.records`): here the summed token loss
    # and token count of each conversation; DPO: the preference terms of each pair.
    record_kind = "language_model"

    def sample_records(self, batch: dict) -> list[SampleRecord]:
        """One record per sample of a batch: its summed token cross entropy (`loss_sum`) and number of
        supervised tokens (`tokens`), exact under packing (the collator's `row_ids` say whose each
        token is), with the sample's origin as id and its metadata columns."""
        origins = batch["origins"]
        split = self._split_head()
        if split is None:
            sums, counts = token_loss_per_row(self(batch), batch["labels"], batch["row_ids"], len(origins))
        else:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
            sums, counts = linear_token_loss_per_row(hidden_states(split, inputs), split.head.weight, split.head.bias,
                                                     batch["labels"], batch["row_ids"], len(origins))
        return [SampleRecord(id=origin, stats={"loss_sum": loss_sum, "tokens": tokens}, meta=dict(meta))
                for origin, loss_sum, tokens, meta in zip(origins, sums.tolist(), counts.tolist(), batch["meta"])]

    def records_info(self) -> dict:
        """Facts the records need beside themselves: per-token losses of two models compare only when
        both split text into the same tokens (`vocabulary`)."""
        if self._vocabulary is None:
            self._vocabulary = vocabulary_fingerprint(self.tokenizer)
        return {"model": self.model_spec.name, "adapter": self.adapter_spec.method, "vocabulary": self._vocabulary}

    def _eval_step(self, batch: dict) -> None:
        self._eval_records += self.sample_records(batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def _finish_evaluation(self, stage: str) -> None:
        """Gathers the split's per-sample records from every process (each sample once, whatever a
        distributed sampler repeated), publishes them at test and logs the metrics they give."""
        mine, self._eval_records = self._eval_records, []
        if stage == "test":
            records = common.publish_records(self, stage, self.record_kind, mine, self.records_info()).records
        else:
            records = common.gather_records(mine)
        self._log_metrics(stage, records)

    def _log_metrics(self, stage: str, records: list[SampleRecord]) -> None:
        # Plain per-sample sums rather than a torchmetrics state: the loss is a per-token mean over the
        # whole split, and sums survive validate-then-fit (inference-mode tensors would not).
        total = sum(r.stats["loss_sum"] for r in records)
        count = sum(r.stats["tokens"] for r in records)
        loss = torch.tensor(total / max(count, 1), dtype=torch.float64)
        self.log(f"{stage}/loss", loss.float(), prog_bar=True)
        self.log(f"{stage}/perplexity", torch.exp(loss.clamp(max=50)).float())

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")
        if self.trainer.sanity_checking or not self.generation_spec.prompts:
            return
        out = common.run_dir(self.trainer)
        if out is None or not self.trainer.is_global_zero:
            return
        convs = [prompt_conversation(p, f"generation.prompts[{i}]") for i, p in enumerate(self.generation_spec.prompts)]
        texts = self.generate(convs)
        path = out / "samples" / f"step_{self.trainer.global_step}.jsonl"
        with atomic_write(path) as f:
            for conv, text in zip(convs, texts):
                f.write(json.dumps({"step": self.trainer.global_step, "messages": conv.messages, "generation": text}) + "\n")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    # ---- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _generate_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
        spec = self.generation_spec
        sampling = dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p) if spec.do_sample else dict(do_sample=False)
        with generation_mode(self.net):  # eval, KV cache on, checkpointing off; training state restored after
            out = self.net.generate(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                    max_new_tokens=spec.max_new_tokens, eos_token_id=stop_token_ids(self.tokenizer),
                                    pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **sampling)
        return self.tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)

    def generate(self, conversations: list[Conversation], batch_size: int = 8) -> list[str]:
        """Greedy (or sampled) replies to conversations, with the chat template's generation prompt."""
        from tqdm.auto import tqdm

        collate = PromptCollator(self.tokenizer)
        texts: list[str] = []
        starts = range(0, len(conversations), batch_size)
        for start in tqdm(starts, desc="[mmtune] generating", unit="batch", disable=len(starts) < 2, leave=False):
            batch = collate(list(enumerate(conversations[start:start + batch_size])))
            texts += self._generate_ids(batch["input_ids"], batch["attention_mask"])
        return texts

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        texts = self._generate_ids(batch["input_ids"], batch["attention_mask"])
        self._predictions += list(zip(batch["index"].tolist(), texts))
        return texts

    def on_predict_epoch_end(self) -> None:
        rows = dict(common.gather_objects(self._predictions))  # duplicates from padded sampling collapse
        self._predictions = []
        out = common.run_dir(self.trainer)
        if not self.trainer.is_global_zero:
            return
        target = Path(self.hparams.predictions_file or str((out or Path(".")) / "predictions.jsonl"))
        prompts = self.trainer.predict_dataloaders.dataset.convs
        with atomic_write(target) as f:
            for i in sorted(rows):
                f.write(json.dumps({"origin": prompts[i].origin, "messages": prompts[i].messages, "generation": rows[i]}) + "\n")
        rank_zero_info(f"[mmtune] wrote {len(rows)} generations to {target}")

    # ---- optimization, callbacks, checkpoints --------------------------------------------------------
    def configure_optimizers(self) -> dict:
        return common.adamw_with_schedule(self.trainer, optimizer_parameters(self.net), self.optimizer_spec,
                                          part_of=part_lookup(lm_parts(self._raw())), part_names=PARTS_DOC,
                                          lr_scale=lora_plus_scale(self.adapter_spec))

    # ---- export --------------------------------------------------------------------------------------
    def export(self, out_dir: str) -> Path:
        """Merges adapters into the base weights and writes `save_pretrained` output with the tokenizer
        and chat template: loadable by plain transformers and by serving engines. Prefix and prompt
        tuning cannot merge: they export the peft adapter with a loading note (`LOADING.md`)."""
        out = Path(out_dir)
        if not self.adapter_spec.mergeable:
            return export_unmerged(self.net, out, self.adapter_spec.method, self.model_spec.name, "causal_lm",
                                   self.tokenizer, "AutoModelForCausalLM", "AutoTokenizer")
        merged = merged_copy(self.net, self.model_spec.quantization != "none",
                             lambda: self._adapt(load_causal_lm(self.model_spec, quantize=False))[0])
        return save_merged_lm(merged, self.tokenizer, self.model_spec, out, "causal_lm")


def save_merged_lm(merged: torch.nn.Module, tokenizer, model_spec: ModelSpec, out: Path, task: str) -> Path:
    """Writes a merged transformers model with its tokenizer and an `mmtune.json` naming the task."""
    if resolve_hf_ref(model_spec).gguf_file:
        # transformers dequantized the GGUF weights on load but still marks the model as GGUF-quantized,
        # which save_pretrained refuses; the tensors are plain floats, so drop the marker.
        merged.hf_quantizer = None
        merged.config.__dict__.pop("quantization_config", None)
    merged.config.use_cache = True
    save_pretrained_safetensors(merged.eval(), out)
    tokenizer.save_pretrained(out)
    (out / "mmtune.json").write_text(json.dumps({"task": task, "source_model": model_spec.name}, indent=2))
    return out
