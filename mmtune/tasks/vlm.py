"""Vision-language fine-tuning: captioning, report generation, VQA and multimodal chat."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from mmtune.adapters import (AdapterReport, apply_adapter, check_quantized_training, lora_plus_scale, merged_copy,
                             optimizer_parameters, part_lookup)
from mmtune.adapters.unmerged import export_unmerged
from mmtune.data.samplers import stratified_sample
from mmtune.data.vl_encoding import build_encoding
from mmtune.losses.chunked import linear_token_loss, linear_token_loss_per_row
from mmtune.losses.tokens import global_token_mean, token_loss, token_loss_per_row
from mmtune.metrics.records import SampleRecord
from mmtune.models.hf import remote_code, resolve_hf_ref, save_pretrained_safetensors, vocabulary_fingerprint
from mmtune.models.generation import generation_mode
from mmtune.models.lm_head import hidden_states, split_head
from mmtune.models.vlm import (PARTS_DOC, decoder_inputs_from_labels, image_token_ids, is_encoder_decoder,
                               load_processor, load_vlm, takes_prompt_learning, vlm_parts)
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec, as_spec, spec_to_dict
from mmtune.tasks import common
from mmtune.tasks.vlm_decoding import DecodingSpec, answer_start
from mmtune.tasks.vlm_records import generation_metrics, sample_records, write_predictions

__all__ = ["DecodingSpec", "VisionLanguageTask"]


@common.TASKS.register("vision_language")
class VisionLanguageTask(common.RunHooks, L.LightningModule):
    """Fine-tunes any transformers image-text-to-text model (BLIP, VisionEncoderDecoder, LLaVA,
    Idefics3/SmolVLM, Qwen2-VL, Qwen2.5-VL, PaliGemma, ...) with its own processor.

    Args:
        model: a hub id or a local `save_pretrained` directory (with the processor saved beside it).
        adapter: adapters and per-part freezing. Parts: `vision` (vision tower), `projector`
            (connector), `language` (LM blocks), `embeddings`, `head`; each `frozen`, `adapter` or
            `full`. Defaults: vision frozen, projector fully trained, language with the adapter
            (fully trained without one), embeddings and head frozen with an adapter.
        optimizer: AdamW settings; `part_lrs` (or `vision_lr`/`projector_lr`) set per-part rates.
        monitor: best-checkpoint and early-stopping metric (`val/loss`; or e.g. `val/bleu4`, max).
        decoding: generation settings for validation, test and predict.
        chat_template: a Jinja template replacing the processor's own (enables chats for models
            without one).
        encoding: `auto`, or force `chat`, `plain`, `prefix_suffix`, `encoder_decoder`
            (`mmtune.data.vl_encoding`).
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower).
        checkpoint_weights: `trainable` (adapters and trained parts only), `full`, or `auto`.
        predictions_file: where test/predict write their JSONL (default: the run directory).
        chunked_loss: decoder-only models compute the token loss from the final hidden states in
            chunks, only at labelled positions, never the full logits (`mmtune.losses.chunked`).
    """

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterSpec = AdapterSpec(method="lora"),
        optimizer: OptimizerSpec = OptimizerSpec(lr=1e-4, weight_decay=0.0),
        monitor: MonitorSpec = MonitorSpec(),
        decoding: DecodingSpec = DecodingSpec(),
        chat_template: Optional[str] = None,
        encoding: Literal["auto", "chat", "plain", "prefix_suffix", "encoder_decoder"] = "auto",
        gradient_checkpointing: bool = False,
        checkpoint_weights: Literal["auto", "trainable", "full"] = "auto",
        predictions_file: Optional[str] = None,
        chunked_loss: bool = True,
    ) -> None:
        super().__init__()
        self.model_spec = as_spec(ModelSpec, model)
        self.adapter_spec = as_spec(AdapterSpec, adapter)
        self.optimizer_spec = as_spec(OptimizerSpec, optimizer)
        self.monitor_spec = as_spec(MonitorSpec, monitor)
        self.decoding_spec = as_spec(DecodingSpec, decoding)
        resolve_hf_ref(self.model_spec)  # fail at construction on a missing path
        check_quantized_training(self.model_spec, self.adapter_spec)
        self.save_hyperparameters({
            "model": spec_to_dict(self.model_spec), "adapter": spec_to_dict(self.adapter_spec),
            "optimizer": spec_to_dict(self.optimizer_spec), "monitor": spec_to_dict(self.monitor_spec),
            "decoding": spec_to_dict(self.decoding_spec), "chat_template": chat_template, "encoding": encoding,
            "gradient_checkpointing": gradient_checkpointing, "checkpoint_weights": checkpoint_weights,
            "predictions_file": predictions_file, "chunked_loss": chunked_loss,
        })
        self.processor = load_processor(self.model_spec, chat_template)
        self.net: Optional[torch.nn.Module] = None
        self.adapter_report: Optional[AdapterReport] = None
        self._encoding = None
        # this process's samples of the current evaluation or prediction: id -> {sample, loss, prediction}
        self._seen: dict[str, dict] = {}
        self._val_chosen: Optional[frozenset[int]] = None  # validation rows to generate for (None: all)
        self._vision_side: Optional[list[torch.nn.Parameter]] = None
        self._split: Optional[tuple] = None  # (net, its SplitHead or None) for the chunked loss

    # ---- build -------------------------------------------------------------------------------------
    def _trainable_only(self) -> bool:
        return common.saves_trainable_only(self.hparams.checkpoint_weights, self.adapter_spec, self.model_spec.pretrained)

    def configure_model(self) -> None:
        if self.net is not None:
            return
        net = load_vlm(self.model_spec)
        net.train()  # from_pretrained returns eval mode; Lightning switches modes only at the top
        gc = bool(self.hparams.gradient_checkpointing)
        if self.model_spec.quantization != "none":
            from peft import prepare_model_for_kbit_training

            net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=gc,
                                                  gradient_checkpointing_kwargs={"use_reentrant": False})
        elif gc:
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(net.config, "use_cache"):
            net.config.use_cache = False
        self.net, self.adapter_report = self._adapt(net)
        rank_zero_info(f"[mmtune] {self.model_spec.name}: {self.adapter_report.summary()}")

    def _adapt(self, net: torch.nn.Module) -> tuple[torch.nn.Module, AdapterReport]:
        parts = vlm_parts(net)
        with_adapter = self.adapter_spec.method != "none"
        defaults = {"vision": "frozen", "projector": "full", "language": "adapter",
                    "embeddings": "frozen" if with_adapter else "full", "head": "frozen" if with_adapter else "full"}
        # Prefix and prompt tuning act on a decoder's input sequence (`takes_prompt_learning` says which take them).
        return apply_adapter(net, self.adapter_spec, "hf", parts, {p: defaults[p] for p in parts},
                             prompt_learning="CAUSAL_LM" if takes_prompt_learning(net) else None)

    def _raw(self) -> torch.nn.Module:
        return self.net.get_base_model() if self.adapter_spec.method != "none" else self.net

    @property
    def encoding(self):
        """How samples become inputs for this model (built on first use: it needs the model config)."""
        if self._encoding is None:
            from transformers import AutoConfig

            config = self.net.config if self.net is not None else \
                AutoConfig.from_pretrained(resolve_hf_ref(self.model_spec).path, **remote_code(self.model_spec))
            raw = self._raw() if self.net is not None else None
            ids = image_token_ids(self.processor, raw) if raw is not None else image_token_ids(self.processor, _Stub(config))
            self._encoding = build_encoding(self.hparams.encoding, self.processor, config, ids)
        return self._encoding

    def setup(self, stage: str) -> None:
        """Gives the data module the encoding (the processor and how this family takes samples)."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        if dm is not None and hasattr(dm, "connect"):
            dm.connect(self.encoding)

    # ---- steps -------------------------------------------------------------------------------------
    def _inputs(self, inputs: dict) -> dict:
        dtype = next(p.dtype for p in self.net.parameters() if p.is_floating_point())
        return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inputs.items()}

    def _logits(self, batch: dict) -> tuple[torch.Tensor, bool]:
        """The batch's logits over its labels, and whether they predict the next token (decoder-only)
        or line up with the labels (encoder-decoder)."""
        raw = self._raw()
        inputs = self._inputs(batch["inputs"])
        if is_encoder_decoder(raw):
            labels = batch["labels"]
            decoder_input_ids = raw.prepare_decoder_input_ids_from_labels(labels) if hasattr(
                raw, "prepare_decoder_input_ids_from_labels") else decoder_inputs_from_labels(labels, raw.config)
            return self.net(**inputs, decoder_input_ids=decoder_input_ids, use_cache=False).logits, False
        # Prompt tuning puts its virtual tokens in front of the outputs: keep the real tokens' positions.
        return self.net(**inputs, use_cache=False).logits[:, -batch["labels"].shape[1]:], True

    def _hidden_and_head(self, batch: dict):
        """(final hidden states, lm_head) where the chunked loss applies (decoder-only, plain head), else None."""
        if not self.hparams.get("chunked_loss", True) or self._device_mesh is not None:
            return None
        if self._split is None or self._split[0] is not self.net:
            self._split = (self.net, split_head(self.net))
        split = self._split[1]
        return None if split is None else (hidden_states(split, self._inputs(batch["inputs"])), split.head)

    def loss_sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token cross entropy over labeled tokens and the token count of a batch."""
        chunked = self._hidden_and_head(batch)
        if chunked is not None:
            hidden, head = chunked
            return linear_token_loss(hidden, head.weight, head.bias, batch["labels"])
        logits, shift = self._logits(batch)
        return token_loss(logits, batch["labels"], shift=shift)

    def sample_losses(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`loss_sums` per sample (batch row): `[B]` summed token losses and token counts."""
        chunked = self._hidden_and_head(batch)
        if chunked is not None:
            hidden, head = chunked
            return linear_token_loss_per_row(hidden, head.weight, head.bias, batch["labels"], rows=len(batch["labels"]))
        logits, shift = self._logits(batch)
        return token_loss_per_row(logits, batch["labels"], rows=len(batch["labels"]), shift=shift)

    def _unused_trainable_guard(self) -> torch.Tensor:
        """Zero that touches every trainable vision-tower and projector weight.

        Under DDP every process must produce a gradient for every trainable parameter each step. A
        text-only batch skips the vision tower and projector, and some families never use parts of
        their tower (LLaVA reads the second-to-last layer, so the last one and the final norm get no
        gradient); the processes would then wait on each other forever. Adding `0 * sum(weights)`
        gives those weights zero gradients at the cost of one sum per weight.
        """
        if self._vision_side is None:
            raw = self._raw()
            part_of = part_lookup(vlm_parts(raw))
            self._vision_side = [p for n, p in raw.named_parameters()
                                 if p.requires_grad and part_of(n) in ("vision", "projector")]
        return sum((p.sum() * 0.0 for p in self._vision_side), torch.zeros((), device=self.device))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, mean = global_token_mean(*self.loss_sums(batch))
        loss = loss + self._unused_trainable_guard()
        size = len(batch["labels"])
        self.log("train/loss", mean, prog_bar=True, batch_size=size)
        self.log("train/truncated", float(batch.get("truncated", 0)), reduce_fx="sum", batch_size=1)
        return loss

    def _eval_step(self, batch: dict, generate: bool) -> None:
        sums, counts = self.sample_losses(batch)
        for entry, loss_sum, tokens in zip(self._entries(batch["index"].tolist()), sums.tolist(), counts.tolist()):
            entry["stats"] = {"loss_sum": loss_sum, "tokens": tokens}
        if generate:
            self._collect(batch, self.generate_batch(batch["prompt_inputs"]))

    def on_validation_epoch_start(self) -> None:
        limit = self.decoding_spec.val_samples
        if limit is None:
            self._val_chosen = None
            return
        # from the whole validation set, not from what each process or the first batches see: the
        # first rows may all be one answer type, and the set must not change between validations
        items = self._current_dataset().items
        self._val_chosen = frozenset(stratified_sample([it.sample.answer_type for it in items], limit,
                                                       self.decoding_spec.val_samples_seed))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, generate=False)
        if not self.trainer.sanity_checking:
            self._generate_chosen(batch)

    def _generate_chosen(self, batch: dict) -> None:
        """Generates for the batch's rows among the chosen validation rows."""
        index = batch["index"].tolist()
        picked = [i for i in index if self._val_chosen is None or i in self._val_chosen]
        if len(picked) == len(index):
            self._collect(batch, self.generate_batch(batch["prompt_inputs"]))
        elif picked:
            # the batch's prompt inputs cannot be cut by row for every family (Qwen2-VL packs the
            # patches of all images into one tensor): the picked rows are encoded again
            dataset = self._current_dataset()
            rows = [dataset[i] for i in picked]
            prompts = dict(self.encoding.prompt_batch([r[1] for r in rows], [r[2] for r in rows]))
            self._collect({"index": torch.tensor(picked)}, self.generate_batch(prompts))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, True)

    def predict_step(self, batch: dict, batch_idx: int) -> list[str]:
        texts = self.generate_batch(batch["prompt_inputs"])
        self._collect(batch, texts)
        return texts

    # ---- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_batch(self, inputs: dict) -> list[str]:
        """Answers for a batch of prompt inputs (from the encoding's `prompt_batch`)."""
        inputs = self._inputs({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()})
        tok = self.processor.tokenizer
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None:
            prompt_ids = prompt_ids.clone()  # some families' generate edits the ids in place
        with generation_mode(self.net):  # eval, KV cache on, checkpointing off; training state restored after
            out = self.net.generate(**inputs, **self.decoding_spec.generate_kwargs(), **self.encoding.generate_kwargs(),
                                    use_cache=True)
        if prompt_ids is not None and not is_encoder_decoder(self._raw()):
            out = out[:, answer_start(out, prompt_ids, inputs.get("input_ids")):]
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]

    def _entries(self, index: list[int]) -> list[dict]:
        """This process's entries (sample, loss, prediction) of dataset rows `index`, made on first use."""
        items = self._current_dataset().items
        return [self._seen.setdefault(items[i].sample.id, {"sample": items[i].sample}) for i in index]

    def _collect(self, batch: dict, texts: list[str]) -> None:
        for entry, text in zip(self._entries(batch["index"].tolist()), texts):
            entry["prediction"] = text

    def _local_records(self) -> list[SampleRecord]:
        """One record per sample this process scored: the generated text (None where it did not
        generate), the reference, the summed token loss and token count, and the sample's metadata
        (accepted answers and answer type for VQA, images, group, the row's other columns)."""
        records = sample_records(self._seen)
        self._seen = {}
        return records

    def _is_vqa(self) -> bool:
        """Whether the split is VQA (its samples were read as questions with accepted answers): it
        decides the same for every process, from the whole split, whichever samples generated."""
        return any(it.sample.format == "vqa" or len(it.sample.answers) > 1 or it.sample.answer_type
                   for it in self._current_dataset().items)

    def records_info(self) -> dict:
        """Facts the records need beside themselves: `vqa` (score VQA accuracy) and the tokenizer's
        `vocabulary` (per-token losses of two models compare only with the same tokens)."""
        return {"model": self.model_spec.name, "adapter": self.adapter_spec.method, "vqa": self._is_vqa(),
                "vocabulary": vocabulary_fingerprint(self.processor.tokenizer)}

    def _current_dataset(self):
        trainer = self.trainer
        if trainer.testing:
            loaders = trainer.test_dataloaders
        elif trainer.predicting:
            loaders = trainer.predict_dataloaders
        else:
            loaders = trainer.val_dataloaders
        return (loaders[0] if isinstance(loaders, (list, tuple)) else loaders).dataset

    # ---- epoch ends ----------------------------------------------------------------------------------
    def _finish(self, stage: str) -> None:
        """Gathers the split's records from every process (each sample once, whatever a distributed
        sampler repeated), publishes them at test, and logs the loss and the text metrics they give."""
        if stage == "test":
            info = self.records_info()
            records = common.publish_records(self, stage, "generation", self._local_records(), info).records
            vqa = info["vqa"]
        else:
            records = common.gather_records(self._local_records())
            vqa = self._is_vqa()
        scored = [r for r in records if "tokens" in r.stats]
        total, count = sum(r.stats["loss_sum"] for r in scored), sum(r.stats["tokens"] for r in scored)
        loss = torch.tensor(total / max(count, 1), dtype=torch.float64)
        self.log(f"{stage}/loss", loss.float(), prog_bar=True, sync_dist=False)
        self.log(f"{stage}/perplexity", torch.exp(loss.clamp(max=50)).float(), sync_dist=False)
        rows = [r for r in records if r.prediction is not None]
        if not rows:
            return
        for name, value in generation_metrics(rows, vqa).items():
            self.log(f"{stage}/{name}", value, sync_dist=False)
        self._write_predictions(stage, rows)

    def _write_predictions(self, stage: str, rows: list[SampleRecord]) -> None:
        out = common.run_dir(self.trainer)
        if not self.trainer.is_global_zero:
            return
        if stage == "val":
            target = (out or Path(".")) / "predictions" / f"val_step_{self.trainer.global_step}.jsonl"
        else:
            target = Path(self.hparams.predictions_file or (out or Path(".")) / "predictions.jsonl")
        write_predictions(target, rows)
        if stage != "val":
            rank_zero_info(f"[mmtune] wrote {len(rows)} predictions to {target}")

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def on_predict_epoch_end(self) -> None:
        rows = common.gather_records(self._local_records())
        if rows:
            self._write_predictions("predict", rows)

    # ---- optimization, callbacks, checkpoints --------------------------------------------------------
    def configure_optimizers(self) -> dict:
        return common.adamw_with_schedule(self.trainer, optimizer_parameters(self.net), self.optimizer_spec,
                                          part_of=part_lookup(vlm_parts(self._raw())), part_names=PARTS_DOC,
                                          lr_scale=lora_plus_scale(self.adapter_spec))

    # ---- export --------------------------------------------------------------------------------------
    def export(self, out_dir: str) -> Path:
        """Merges adapters into the base weights, keeping every fully trained part (vision tower,
        projector), and writes `save_pretrained` output with the processor: loadable by plain
        transformers (`AutoModelForImageTextToText`, `AutoProcessor`)."""
        out = Path(out_dir)
        if not self.adapter_spec.mergeable:  # prefix/prompt tuning: the peft adapter and a loading note
            trained_base = any(p.requires_grad for p in self._raw().parameters())  # e.g. the projector
            return export_unmerged(self.net, out, self.adapter_spec.method, self.model_spec.name, "vision_language",
                                   self.processor, "AutoModelForImageTextToText", "AutoProcessor",
                                   (lambda d: save_pretrained_safetensors(self._raw(), d)) if trained_base else None)
        merged = merged_copy(self.net, self.model_spec.quantization != "none",
                             lambda: self._adapt(load_vlm(self.model_spec, quantize=False))[0])
        if hasattr(merged.config, "use_cache"):
            merged.config.use_cache = True
        save_pretrained_safetensors(merged.eval(), out)
        self.processor.save_pretrained(out)
        (out / "mmtune.json").write_text(json.dumps({"task": "vision_language", "source_model": self.model_spec.name},
                                                    indent=2))
        return out


class _Stub:
    """A model stand-in carrying only a config (the encoding is needed before the model is built)."""

    def __init__(self, config) -> None:
        self.config = config

