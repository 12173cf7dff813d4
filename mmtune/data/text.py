"""The data module of causal-LM fine-tuning: local files -> conversations or plain text -> token ids
with loss masks -> padded or packed batches.

The jobs live in sibling modules: reading files into samples (`text_reading`), tokenizing with loss
masks (`text_tokens`), packing and collation (`text_batches`). Their public names are re-exported
here, so `from mmtune.data.text import ...` keeps working.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional

import lightning as L
from torch.utils.data import DataLoader, Dataset

from mmtune.data.samplers import EpochSampler, ResumableLoader
from mmtune.data.splits import SPLIT_NAMES, assign_splits
from mmtune.data.text_batches import Collator, PromptCollator, PromptDataset, TokenDataset, pack
from mmtune.data.text_reading import (READERS, ROLE_ALIASES, ROLES, Conversation, PlainText, Sample, TextFields,
                                      TextFormat, TextSource, detect_format, prompt_conversation, raw_turns,
                                      read_prompts, read_source, row_to_sample)
from mmtune.data.text_tokens import (IGNORE, Tokenized, assistant_spans, rendered_spans, tokenize_conversation,
                                     tokenize_text)
from mmtune.errors import ConfigError, DataError

log = logging.getLogger("mmtune")

__all__ = [
    "IGNORE", "READERS", "ROLES", "ROLE_ALIASES", "Collator", "Conversation", "PlainText", "PromptCollator",
    "PromptDataset", "Sample", "TextData", "TextFields", "TextFormat", "TextSource", "TokenDataset", "Tokenized",
    "assistant_spans", "detect_format", "pack", "prompt_conversation", "raw_turns", "read_prompts", "read_source",
    "rendered_spans", "row_to_sample", "tokenize_conversation", "tokenize_text",
]


class TextData(L.LightningDataModule):
    """Instruction, chat or plain-text data for `CausalLMTask`.

    The task connects itself in its `setup` (`connect(tokenizer)`), after which samples are tokenized
    with the model's own tokenizer and chat template.

    Args:
        path: one data file (.json, .jsonl, .csv, .parquet); split into train/val/test by `split`
            unless `val_path`/`test_path` are given.
        sources: several training files mixed with weights (instead of, or besides, `path`).
        format: format of `path` (`auto` detects it from the fields).
        fields: field names of `path`, where they differ from the defaults.
        val_path: a separate validation file.
        test_path: a separate test file.
        predict_path: prompts to generate for (`prompt`, `instruction` or `messages` rows).
        split: train/val/test shares of `path` when no separate val/test files are given.
        seed: split, subsampling and shuffle seed.
        shuffle: reshuffle the training rows every epoch; False keeps the file's order (curricula).
        assistant_only_loss: loss on assistant tokens only; False trains on every token.
        max_length: longest sample in tokens (and the row length when packing).
        overlong: a longer sample is `truncate`d or `drop`ped; either way it is counted and reported.
        packing: several samples per training row (attention kept inside each sample).
        batch_size: rows per training batch per device.
        eval_batch_size: rows per evaluation batch (default: `batch_size`).
        num_workers: data loading processes.
    """

    def __init__(
        self,
        path: Optional[str] = None,
        sources: list[TextSource] = [],  # noqa: B006  (jsonargparse needs a plain default)
        format: TextFormat = "auto",
        fields: TextFields = TextFields(),
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        predict_path: Optional[str] = None,
        split: tuple[float, float, float] = (0.9, 0.1, 0.0),
        seed: int = 42,
        shuffle: bool = True,
        assistant_only_loss: bool = True,
        max_length: int = 1024,
        overlong: Literal["truncate", "drop"] = "truncate",
        packing: bool = False,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.val_path, self.test_path, self.predict_path = path, val_path, test_path, predict_path
        self.sources = [s if isinstance(s, TextSource) else TextSource(**s) for s in sources]
        self.format = format
        self.fields = fields if isinstance(fields, TextFields) else TextFields(**fields)
        self.split_ratios = tuple(split)
        self.seed = seed
        self.shuffle = shuffle
        self.assistant_only_loss = assistant_only_loss
        if max_length < 2:
            raise ConfigError(f"data.max_length must be at least 2, got {max_length}")
        self.max_length = max_length
        self.overlong = overlong
        self.packing = packing
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers

        self.samples: dict[str, list[Sample]] = {}
        self.prompts: list[Conversation] = []
        self.tokenized: dict[str, list[Tokenized]] = {}
        self.stats: dict[str, dict[str, int]] = {}
        self.tokenizer = None

    # ---- reading ---------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if stage in ("fit", "validate", "test", None) and not self.samples:
            self._read_labeled()
        if stage == "predict" and not self.prompts:
            if not self.predict_path:
                raise DataError("data.predict_path is not set: name a JSONL file of prompts")
            self.prompts = read_prompts(self.predict_path)

    def _read_labeled(self) -> None:
        if not self.path and not self.sources:
            raise DataError("data.path (or data.sources) is not set: name a .jsonl/.json/.csv/.parquet file")
        splits: dict[str, list[Sample]] = {name: [] for name in SPLIT_NAMES}
        if self.path:
            main = self._read(TextSource(self.path, self.format, 1.0, self.fields))
            ratios = [0.0 if (name == "val" and self.val_path) or (name == "test" and self.test_path) else r
                      for name, r in zip(SPLIT_NAMES, self.split_ratios)]
            for sample, name in zip(main, assign_splits(len(main), ratios, self.seed)):
                splits[name].append(sample)
        rng = random.Random(self.seed)
        for source in self.sources:
            if source.weight < 0:
                raise ConfigError(f"data.sources: weight of {source.path} is negative")
            rows = self._read(source)
            whole, part = divmod(source.weight, 1.0)
            splits["train"] += rows * int(whole) + rng.sample(rows, round(part * len(rows)))
        if self.val_path:
            splits["val"] = self._read(TextSource(self.val_path, self.format, 1.0, self.fields))
        if self.test_path:
            splits["test"] = self._read(TextSource(self.test_path, self.format, 1.0, self.fields))
        if not splits["train"]:
            raise DataError(f"the train split is empty (sources: {self.path or [s.path for s in self.sources]})")
        self.samples = splits

    def _read(self, source: TextSource) -> list:
        return read_source(source)

    # ---- connection to the task -----------------------------------------------------------------------
    def connect(self, tokenizer) -> None:
        """Tokenizes every split with the model's tokenizer; counts truncated and dropped samples."""
        if self.tokenizer is tokenizer and self.tokenized:
            return
        self.tokenizer = tokenizer
        self.tokenized, self.stats = {}, {}
        for name, samples in self.samples.items():
            self.tokenized[name], self.stats[name] = self._tokenize(samples)
        for name, st in self.stats.items():
            if st["truncated"] or st["dropped"] or st["no_target"]:
                log.warning("[mmtune] %s split: %d of %d samples longer than max_length=%d were %s; %d kept no "
                            "target token and were dropped", name, st["truncated"] + st["dropped"], st["samples"],
                            self.max_length, "truncated" if self.overlong == "truncate" else "dropped", st["no_target"])
        self._write_stats()

    def _tokenize(self, samples: list[Sample]) -> tuple[list[Tokenized], dict[str, int]]:
        out: list[Tokenized] = []
        st = {"samples": len(samples), "truncated": 0, "dropped": 0, "no_target": 0, "tokens": 0}
        for sample in samples:
            if isinstance(sample, PlainText):
                item = tokenize_text(self.tokenizer, sample)
            else:
                item = tokenize_conversation(self.tokenizer, sample, self.assistant_only_loss)
            if len(item) > self.max_length:
                if self.overlong == "drop":
                    st["dropped"] += 1
                    continue
                st["truncated"] += 1
                item = replace(item, input_ids=item.input_ids[:self.max_length], labels=item.labels[:self.max_length])
            if all(label == IGNORE for label in item.labels[1:]):
                st["no_target"] += 1  # e.g. the reply was cut off entirely: nothing to learn, and a NaN loss
                continue
            st["tokens"] += len(item)
            out.append(item)
        return out, st

    def _write_stats(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not log_dir:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / "data_stats.json").write_text(json.dumps(
            {"max_length": self.max_length, "overlong": self.overlong, "packing": self.packing, "splits": self.stats},
            indent=2))

    # ---- loaders -----------------------------------------------------------------------------------------
    def _rows(self, split: str, packed: bool) -> TokenDataset:
        if self.tokenizer is None:
            raise RuntimeError("connect() the data module to a task before asking for data (Trainer does this in setup)")
        items = self.tokenized.get(split) or []
        if not items:
            raise DataError(f"the {split} split is empty (source: {self.path or [s.path for s in self.sources]}); "
                            "add data or adjust data.split")
        if packed:
            return TokenDataset([[items[i] for i in b] for b in pack([len(x) for x in items], self.max_length)])
        return TokenDataset([[x] for x in items])

    def _loader(self, dataset: Dataset, batch_size: int, collate, **kwargs) -> DataLoader:
        loader = ResumableLoader if isinstance(kwargs.get("sampler"), EpochSampler) else DataLoader  # training: resumes mid-epoch
        return loader(dataset, batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate,
                      persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        dataset = self._rows("train", self.packing)
        sampler = EpochSampler.for_this_process(len(dataset), self.seed, shuffle=self.shuffle)
        return self._loader(dataset, self.batch_size, self._collator(self.packing), sampler=sampler)

    def _collator(self, packed: bool):
        return Collator(self.tokenizer.pad_token_id, packed)

    def val_dataloader(self) -> DataLoader:
        # Unpacked, so validation loss is exact whatever the training layout.
        return self._loader(self._rows("val", False), self.eval_batch_size, self._collator(False))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._rows("test", False), self.eval_batch_size, self._collator(False))

    def predict_dataloader(self) -> DataLoader:
        if self.tokenizer is None:
            raise RuntimeError("connect() the data module to a task before asking for data")
        return self._loader(PromptDataset(self.prompts), self.eval_batch_size, PromptCollator(self.tokenizer))
