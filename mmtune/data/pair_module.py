"""What the image-text and the query-document data modules share: reading a manifest and its
separate val/test files, split placement, the drop-or-stop policy for bad pairs, and loaders whose
training batches are sharded per process and never end in a single pair (a contrastive loss needs
negatives)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from mmtune.data.bad_rows import stop_or_skip, write_skipped
from mmtune.data.samplers import EpochSampler, ResumableLoader
from mmtune.data.splits import SPLIT_NAMES, place_in_splits
from mmtune.errors import DataError


class ContrastivePairData(L.LightningDataModule):
    """Base of `ImageTextPairData` and `QueryDocData`; subclasses say how to read a source, check its
    rows and batch them. Rows carry `split`, `group` and `origin`."""

    kind = "pairs"  # what a source holds, for messages

    def __init__(self, path: Optional[str], val_path: Optional[str], test_path: Optional[str],
                 split: tuple[float, float, float], seed: int, columns: dict, bad_pairs: str, batch_size: int,
                 eval_batch_size: Optional[int], num_workers: int) -> None:
        super().__init__()
        self.path, self.val_path, self.test_path = path, val_path, test_path
        self.split_ratios, self.seed = tuple(split), seed
        self.columns = columns
        self.bad_pairs = bad_pairs
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self.splits: dict[str, list] = {}
        self.skipped: dict[str, str] = {}
        self.preprocess = None

    # ---- what subclasses provide ---------------------------------------------------------------------
    def read(self, source: str) -> tuple[list, dict[str, str]]:
        """Rows of one source, and {origin: reason} for its bad rows."""
        raise NotImplementedError

    def find_bad(self, rows: list, bad: dict[str, str]) -> None:
        """Adds problems found across all rows (e.g. unreadable images) to `bad`."""

    def check_train(self, train: list) -> None:
        """Refuses a training split the model cannot use."""

    def dataset(self, split: str, rows: list) -> Dataset:
        raise NotImplementedError

    def collate(self, split: str) -> Callable[[list], Any]:
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if not self.splits:
            self._read()
        write_skipped(self.trainer, self.skipped, "skipped_pairs.csv", "row")

    def _read(self) -> None:
        if not self.path:
            raise DataError(f"data.path is not set: name a manifest of {self.kind}")
        rows, bad = self.read(self.path)
        extra = {}
        for name, src in (("val", self.val_path), ("test", self.test_path)):
            if src:
                extra[name], more = self.read(src)
                bad.update(more)
        rows = place_in_splits(rows, extra, self.split_ratios, self.seed, bool(self.columns.get("group_column")),
                               self.path)
        self.find_bad(rows, bad)
        stop_or_skip(bad, self.bad_pairs, "bad pair", "data.bad_pairs", "skipped_pairs.csv")
        self.skipped = dict(bad)
        rows = [r for r in rows if r.origin not in bad]
        self.splits = {name: [r for r in rows if r.split == name] for name in SPLIT_NAMES}
        if len(self.splits["train"]) < 2:
            raise DataError(f"the train split of {self.path} has {len(self.splits['train'])} pair(s); "
                            "contrastive training needs at least 2 (in-batch negatives)")
        self.check_train(self.splits["train"])

    def connect(self, preprocess) -> None:
        """Takes the model's image transform and tokenizer (`mmtune.models.aligners.Preprocess`)."""
        self.preprocess = preprocess

    def _loader(self, split: str, batch_size: int, **kwargs) -> DataLoader:
        if self.preprocess is None:
            raise RuntimeError("connect() the data module to a task before asking for data (Trainer does this in setup)")
        rows = self.splits.get(split) or []
        if not rows:
            raise DataError(f"the {split} split is empty (source: {self.path}); add pairs or adjust data.split")
        loader = ResumableLoader if isinstance(kwargs.get("sampler"), EpochSampler) else DataLoader  # training: resumes mid-epoch
        return loader(self.dataset(split, rows), batch_size=batch_size, num_workers=self.num_workers,
                      persistent_workers=self.num_workers > 0, collate_fn=self.collate(split),
                      pin_memory=torch.cuda.is_available(), **kwargs)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSampler.for_this_process(len(self.splits.get("train") or []), self.seed)
        return self._loader("train", self.batch_size, sampler=sampler.no_single_item_batch(self.batch_size))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)
