"""Image-text alignment: contrastive fine-tuning of CLIP, SigLIP and timm + transformers dual encoders."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from mmtune.adapters import AdapterReport, apply_adapter, lora_plus_scale, merge_adapter, part_lookup
from mmtune.errors import ConfigError
from mmtune.losses.contrastive import LOSSES
from mmtune.metrics.records import SampleRecord
from mmtune.metrics.retrieval import distinct_items, distinct_ranks, pair_retrieval_metrics
from mmtune.models.aligners import ALIGNERS, resolve_aligner
from mmtune.specs import AdapterSpec, ModelSpec, MonitorSpec, OptimizerSpec, as_spec, spec_to_dict
from mmtune.tasks import common

PARTS_DOC = {"vision": "the image tower", "text": "the text tower",
             "projection": "projection heads, temperature and bias"}
# the two directions' names, prefixes of both the training loss terms and the retrieval metrics
IMAGE_DIRECTIONS, TEXT_DIRECTIONS = ("i2t", "t2i"), ("q2d", "d2q")


@common.TASKS.register("image_text_alignment")
class ImageTextAlignmentTask(common.RunHooks, L.LightningModule):
    """Contrastive image-text alignment with in-batch negatives gathered over every process; with a
    sentence-transformers model and `QueryDocData`, text embedding fine-tuning (query, positive[, hard
    negative]) with the same losses and Recall@K/MRR query -> document.

    Args:
        model: a CLIP or SigLIP model (hub id or local directory), a directory exported from a dual
            encoder, the timm image backbone of a new dual encoder (with `text_model`), or a
            sentence-transformers folder (text embeddings).
        adapter: adapters and per-tower freezing; parts are `vision`, `text` and `projection`
            (projection heads, `logit_scale` and `logit_bias`).
        optimizer: AdamW settings; `part_lrs` may set `vision`, `text`, `projection`.
        monitor: best-checkpoint and early-stopping metric (e.g. `val/mean_recall`, max).
        text_model: the transformers text encoder of a new dual encoder.
        loss: `infonce` (CLIP), `sigmoid` (SigLIP), or `auto` (the family's own).
        pooling: text pooling of a new dual encoder: `mean` or `cls`.
        embed_dim: projection size of a new dual encoder.
        max_text_length: truncate texts to this many tokens (default: the text model's limit).
        learn_logit_scale: train the temperature (and the bias, for the sigmoid loss).
        recall_at: the K of Recall@K.
        zero_shot_template: prompt for zero-shot classification from class names, with `{}` for the
            name; evaluated when the data has a label column.
        checkpoint_weights: `trainable` (adapters and trained parts only), `full`, or `auto`.
    """

    def __init__(
        self,
        model: ModelSpec,
        adapter: AdapterSpec = AdapterSpec(),
        optimizer: OptimizerSpec = OptimizerSpec(),
        monitor: MonitorSpec = MonitorSpec(),
        text_model: Optional[ModelSpec] = None,
        loss: Literal["auto", "infonce", "sigmoid"] = "auto",
        pooling: Literal["mean", "cls"] = "mean",
        embed_dim: int = 256,
        max_text_length: Optional[int] = None,
        learn_logit_scale: bool = True,
        recall_at: tuple[int, ...] = (1, 5, 10),
        zero_shot_template: str = "a photo of a {}",
        checkpoint_weights: Literal["auto", "trainable", "full"] = "auto",
    ) -> None:
        super().__init__()
        self.model_spec = as_spec(ModelSpec, model)
        self.text_model_spec = as_spec(ModelSpec, text_model) if text_model is not None else None
        self.adapter_spec = as_spec(AdapterSpec, adapter)
        self.optimizer_spec = as_spec(OptimizerSpec, optimizer)
        self.monitor_spec = as_spec(MonitorSpec, monitor)
        self.family_name = resolve_aligner(self.model_spec, self.text_model_spec)  # fails early on unknown models
        self.family = ALIGNERS.get(self.family_name)
        if "{}" not in zero_shot_template:
            raise ConfigError(f"zero_shot_template {zero_shot_template!r} needs a '{{}}' for the class name")
        self.save_hyperparameters({
            "model": spec_to_dict(self.model_spec), "adapter": spec_to_dict(self.adapter_spec),
            "optimizer": spec_to_dict(self.optimizer_spec), "monitor": spec_to_dict(self.monitor_spec),
            "text_model": spec_to_dict(self.text_model_spec) if self.text_model_spec else None,
            "loss": loss, "pooling": pooling, "embed_dim": embed_dim, "max_text_length": max_text_length,
            "learn_logit_scale": learn_logit_scale, "recall_at": list(recall_at),
            "zero_shot_template": zero_shot_template, "checkpoint_weights": checkpoint_weights,
        })
        self.net: Optional[torch.nn.Module] = None
        self.preprocess = None
        self.export_extra = None
        self.adapter_report: Optional[AdapterReport] = None
        self._eval: dict[str, list] = {}

    # ---- build -------------------------------------------------------------------------------------
    @property
    def loss_name(self) -> str:
        return self.family.loss if self.hparams.loss == "auto" else self.hparams.loss

    def _trainable_only(self) -> bool:
        # a new dual encoder's projection heads start random: they are trainable, hence saved
        return common.saves_trainable_only(self.hparams.checkpoint_weights, self.adapter_spec,
                                           self.model_spec.pretrained or bool(self.model_spec.checkpoint))

    def _options(self) -> dict:
        return {"pooling": self.hparams.pooling, "embed_dim": self.hparams.embed_dim,
                "max_text_length": self.hparams.max_text_length, "loss": self.loss_name}

    def _build(self) -> None:
        if self.net is not None:
            return
        module, self.preprocess, self.export_extra = self.family.build(self.model_spec, self.text_model_spec, self._options())
        module.train()  # from_pretrained returns eval mode; Lightning switches modes only at the top
        self.net, self.adapter_report = apply_adapter(
            module, self.adapter_spec, self.family.targets, parts=self.family.parts,
            default_policies={"vision": "adapter", "text": "adapter", "projection": "full"},
        )
        if not self.hparams.learn_logit_scale:
            for name, param in self._raw().named_parameters():
                if name.split(".")[-1] in ("logit_scale", "logit_bias"):
                    param.requires_grad_(False)
        rank_zero_info(f"[mmtune] {self.model_spec.name} ({self.family_name}, {self.loss_name} loss): "
                       f"{self.adapter_report.summary()}")

    def setup(self, stage: str) -> None:
        """Builds the model (its processor is needed by the data) and connects the data module."""
        self._build()
        dm = self._trainer.datamodule if self._trainer is not None else None
        if dm is not None:
            dm.connect(self.preprocess)

    def configure_model(self) -> None:
        self._build()
        world, rank = 1, 0
        trainer = self._trainer  # None when rebuilt from a checkpoint for export
        if trainer is not None and trainer.world_size > 1:
            world, rank = trainer.world_size, trainer.global_rank
        self.criterion = LOSSES[self.loss_name](rank=rank, world_size=world)

    def _raw(self) -> torch.nn.Module:
        return self.net.get_base_model() if self.adapter_spec.method != "none" else self.net

    # ---- steps -------------------------------------------------------------------------------------
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net.encode_image(pixels), dim=-1)

    def embed_texts(self, batch: dict, prefix: str = "") -> torch.Tensor:
        return F.normalize(self.net.encode_text(batch[f"{prefix}input_ids"], batch.get(f"{prefix}attention_mask")), dim=-1)

    def embed_queries(self, batch: dict) -> torch.Tensor:
        """The left side of a pair: images, or queries for text embedding data."""
        return self.embed_images(batch["pixels"]) if "pixels" in batch else self.embed_texts(batch, "query_")

    @staticmethod
    def _keys(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return (batch["image_key"] if "image_key" in batch else batch["query_key"]), batch["text_key"]

    def loss_terms(self, image: torch.Tensor, text: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        raw = self._raw()
        negatives = self.embed_texts(batch, "neg_") if "neg_input_ids" in batch else None
        directions = IMAGE_DIRECTIONS if "pixels" in batch else TEXT_DIRECTIONS
        return self.criterion(image, text, raw.logit_scale, keys=self._keys(batch), logit_bias=raw.logit_bias,
                              negatives=negatives, negative_keys=batch.get("neg_key"), directions=directions)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image, text = self.embed_queries(batch), self.embed_texts(batch)
        terms = self.loss_terms(image, text, batch)
        loss = sum(terms.values())
        n = len(image)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=n)
        # each process's loss covers its own rows against the global batch; their mean is the global loss
        self.log("train/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        self.log("train/logit_scale", self._raw().logit_scale.detach().exp(), batch_size=n)
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        image, text = self.embed_queries(batch), self.embed_texts(batch)
        self._text_only = "pixels" not in batch
        ikey, tkey = self._keys(batch)
        store = self._eval.setdefault(stage, [])
        store.append((batch["index"].cpu(), image.float().cpu(), text.float().cpu(), ikey.cpu(), tkey.cpu(),
                      list(batch["labels"])))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _collected(self, stage: str) -> dict:
        """The stage's embeddings from every process, one row per pair (sampler padding removed)."""
        rows = {}
        for index, image, text, ikey, tkey, labels in common.gather_objects(self._eval.pop(stage, [])):
            for j, i in enumerate(index.tolist()):
                rows[i] = (image[j], text[j], ikey[j], tkey[j], labels[j])
        order = sorted(rows)
        return {"index": order, "image": torch.stack([rows[i][0] for i in order]), "text": torch.stack([rows[i][1] for i in order]),
                "image_key": torch.stack([rows[i][2] for i in order]), "text_key": torch.stack([rows[i][3] for i in order]),
                "labels": [rows[i][4] for i in order]}

    def _full_set_loss(self, data: dict) -> dict[str, float]:
        """The loss over the whole evaluation set as one batch (scores computed once, on CPU)."""
        raw = self._raw()
        criterion = LOSSES[self.loss_name]()
        with torch.no_grad():
            bias = raw.logit_bias.detach().float().cpu() if raw.logit_bias is not None else None
            terms = criterion(data["image"], data["text"], raw.logit_scale.detach().float().cpu(),
                              keys=(data["image_key"], data["text_key"]), logit_bias=bias)
        return {"loss": float(sum(terms.values()))}

    def _eval_epoch_end(self, stage: str) -> dict:
        data = self._collected(stage)
        if stage == "test":
            self._publish_records(stage, data)
        names = TEXT_DIRECTIONS if getattr(self, "_text_only", False) else IMAGE_DIRECTIONS
        values = pair_retrieval_metrics(data["image"], data["text"], (data["image_key"], data["text_key"]),
                                        ks=self.hparams.recall_at, names=names)
        if len(data["labels"]) >= 2:
            values.update(self._full_set_loss(data))
        if all(data["labels"]) and len(set(data["labels"])) >= 2 and not getattr(self, "_text_only", False):
            images, _ = distinct_items(data["image_key"])  # an image with several captions counts once
            values["zero_shot_accuracy"] = self.zero_shot_accuracy(data["image"][images],
                                                                   [data["labels"][i] for i in images.tolist()])
        for name, value in values.items():
            # every process computed the same values from the gathered set: no further reduction
            self.log(f"{stage}/{name}", value, prog_bar=name in ("mean_recall", "loss"))
        return values

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _publish_records(self, stage: str, data: dict) -> None:
        """One record per distinct query of each direction: its rank (0-based, among distinct items),
        the pair row that names it and that row's columns (its fields and the manifest's other
        columns, so subgroup audits can slice by them); zero-shot correctness for image queries.
        The evaluation room resamples queries within each direction for intervals."""
        dataset = self.trainer.test_dataloaders.dataset
        rows = getattr(dataset, "pairs", None) or dataset.rows
        names = TEXT_DIRECTIONS if getattr(self, "_text_only", False) else IMAGE_DIRECTIONS
        zero_shot = None
        if all(data["labels"]) and len(set(data["labels"])) >= 2 and not getattr(self, "_text_only", False):
            zero_shot = self.zero_shot_predictions(data["image"], data["labels"])
        records = []
        sides = ((names[0], data["image"], data["text"], data["image_key"], data["text_key"]),
                 (names[1], data["text"], data["image"], data["text_key"], data["image_key"]))
        for direction, queries, docs, qkeys, dkeys in sides:
            ranks, first_rows = distinct_ranks(queries, docs, qkeys, dkeys)
            for rank, row in zip(ranks.tolist(), first_rows.tolist()):
                item = rows[data["index"][row]]
                # the row's own fields and its other manifest columns, flat (a subgroup column is a key)
                fields = {k: v for k, v in vars(item).items() if k not in ("split", "meta") and v is not None}
                meta = {**(getattr(item, "meta", None) or {}), **fields}
                stats = {"rank": float(rank)}
                if zero_shot is not None and direction == names[0]:
                    stats["zero_shot_correct"] = float(zero_shot[row])
                records.append(SampleRecord(id=f"{direction}:{item.origin or data['index'][row]}", stats=stats,
                                            meta={"direction": direction, **meta}))
        common.publish_records(self, stage, "retrieval", records, {"recall_at": list(self.hparams.recall_at),
                                                                   "directions": list(names)})

    @torch.no_grad()
    def zero_shot_predictions(self, image: torch.Tensor, labels: list[str]) -> torch.Tensor:
        """Per image: whether the class whose prompt embeds closest is its label."""
        classes = sorted(set(labels))
        prompts = [self.hparams.zero_shot_template.format(c) for c in classes]
        batch = {k: v.to(self.device) for k, v in self.preprocess.text(prompts).items()}
        class_emb = self.embed_texts(batch).float().cpu()
        predicted = (image @ class_emb.T).argmax(dim=1)
        return predicted == torch.tensor([classes.index(label) for label in labels])

    def zero_shot_accuracy(self, image: torch.Tensor, labels: list[str]) -> float:
        """Accuracy of classifying each image as the class whose prompt embeds closest."""
        return self.zero_shot_predictions(image, labels).float().mean().item()

    # ---- optimization, callbacks, checkpoints --------------------------------------------------------
    def configure_optimizers(self) -> dict:
        part_of = part_lookup(self.family.parts)
        no_decay = [n for n, _ in self._raw().named_parameters() if n.split(".")[-1] in ("logit_scale", "logit_bias")]
        return common.adamw_with_schedule(self.trainer, self._raw().named_parameters(), self.optimizer_spec,
                                          part_of=part_of, part_names=PARTS_DOC, no_decay=no_decay,
                                          lr_scale=lora_plus_scale(self.adapter_spec))

    # ---- export --------------------------------------------------------------------------------------
    def export(self, out_dir: str) -> Path:
        """Merges adapters and writes the family's native format (CLIP/SigLIP: `save_pretrained` of the
        model and its processor, loadable by plain transformers)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        merged = merge_adapter(copy.deepcopy(self.net)).eval()
        self.family.export(merged, self.export_extra, out)
        (out / "mmtune.json").write_text(json.dumps({
            "task": "image_text_alignment", "family": self.family_name, "loss": self.loss_name,
            "source_model": self.model_spec.name,
        }, indent=2))
        return out
