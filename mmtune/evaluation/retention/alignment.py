"""Retention of image-text aligners (CLIP, SigLIP, dual encoders) and text embedding models: zero-shot
accuracy on a general labeled image set (`zero_shot`) and Recall@K/MRR on general pairs (`retrieval`),
computed with the alignment task's own embeddings, prompts and retrieval metrics."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mmtune.data.images import load_image
from mmtune.data.pairs import PairCollate, PairDataset, read_pairs
from mmtune.data.readers import ManifestColumns, read_image_labels
from mmtune.data.text_pairs import QueryDocCollate, QueryDocDataset, read_query_docs
from mmtune.errors import ConfigError
from mmtune.evaluation.retention.scorers import SCORERS, Runner, Scorer, limited
from mmtune.evaluation.retention.spec import RetentionSet
from mmtune.metrics.retrieval import pair_retrieval_metrics

ALIGNMENT = "an image-text alignment or embedding task (ImageTextAlignmentTask)"


def _is_alignment(task: nn.Module) -> bool:
    from mmtune.tasks.alignment import ImageTextAlignmentTask

    return isinstance(task, ImageTextAlignmentTask)


class _Images(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform, channels: int) -> None:
        self.paths, self.transform, self.channels = paths, transform, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i], self.channels))


@SCORERS.register("zero_shot")
class ZeroShotScorer(Scorer):
    """Zero-shot accuracy: each image is classified as the class whose prompt (the task's
    `zero_shot_template`) embeds closest; classes are the labels of the set (`<class>/x.png` folders or a
    `path,label` manifest)."""

    kind = "zero_shot"
    needs = "an image-text alignment task with an image tower (CLIP, SigLIP, dual encoder)"
    default_metrics = ("zero_shot_accuracy",)

    @classmethod
    def fits(cls, task: nn.Module) -> bool:
        return _is_alignment(task)

    def __init__(self, rset: RetentionSet, task: nn.Module, runner: Runner) -> None:
        super().__init__(rset, task, runner)
        if task.preprocess.image is None:
            raise ConfigError(f"retention set {rset.name!r}: kind zero_shot needs a model with an image tower; "
                              f"{task.model_spec.name} is a text embedding model (use kind retrieval with "
                              "query-document pairs)")
        columns = ManifestColumns(path=rset.columns.get("path", "path"), label=rset.columns.get("label", "label"))
        samples = limited(read_image_labels(rset.path, columns), rset.limit)
        unlabeled = [s for s in samples if len(s.labels) != 1]
        if unlabeled:
            raise self.fail(f"{unlabeled[0].origin}: zero-shot needs exactly one label per image, got "
                            f"{list(unlabeled[0].labels)}")
        self.labels = [s.labels[0] for s in samples]
        if len(set(self.labels)) < 2:
            raise self.fail(f"zero-shot needs at least 2 classes, found {sorted(set(self.labels))}")
        pre = task.preprocess
        self.loader = DataLoader(_Images([s.path for s in samples], pre.image, pre.channels),
                                 batch_size=rset.batch_size, shuffle=False, num_workers=0)

    def score(self, task: nn.Module) -> dict[str, float]:
        with self.runner.scoring(task):
            image = torch.cat([self.runner.run(lambda px: task.embed_images(px).float().cpu(), px) for px in self.loader])
            with self.runner.context():
                accuracy = task.zero_shot_accuracy(image, self.labels)
        return {"zero_shot_accuracy": float(accuracy)}


@SCORERS.register("retrieval")
class RetrievalScorer(Scorer):
    """Recall@K (the task's `recall_at`) and MRR both ways on general pairs: image-text pairs
    (`image,text` manifest) for aligners, query-document pairs (`query,positive`) for text embedding
    models. Identical captions and images count as relevant, as in the task's own validation."""

    kind = "retrieval"
    needs = ALIGNMENT
    default_metrics = ("mean_recall",)

    @classmethod
    def fits(cls, task: nn.Module) -> bool:
        return _is_alignment(task)

    def __init__(self, rset: RetentionSet, task: nn.Module, runner: Runner) -> None:
        super().__init__(rset, task, runner)
        pre, cols = task.preprocess, rset.columns
        self.text_only = pre.image is None
        if self.text_only:
            rows, bad = read_query_docs(rset.path, cols.get("query", "query"), cols.get("positive", "positive"), None,
                                        cols.get("split", "split"), None)
            dataset, collate = QueryDocDataset(limited(rows, rset.limit)), QueryDocCollate(pre.text, False)
        else:
            rows, bad = read_pairs(rset.path, cols.get("image", "image"), cols.get("text", "text"),
                                   cols.get("split", "split"))
            dataset, collate = PairDataset(limited(rows, rset.limit), pre.image, pre.channels), PairCollate(pre.text)
        used = {r.origin for r in limited(rows, rset.limit)}
        bad = {origin: why for origin, why in bad.items() if origin in used}
        if bad:
            origin, why = next(iter(bad.items()))
            raise self.fail(f"{len(bad)} bad row(s), e.g. {origin}: {why}")
        if len(dataset) < 2:
            raise self.fail(f"retrieval needs at least 2 pairs, found {len(dataset)}")
        self.loader = DataLoader(dataset, batch_size=rset.batch_size, shuffle=False, num_workers=0, collate_fn=collate)

    def _embed(self, task: nn.Module, batch: dict) -> tuple[Any, ...]:
        query = task.embed_queries(batch)
        key = batch["query_key"] if self.text_only else batch["image_key"]
        return query.float().cpu(), task.embed_texts(batch).float().cpu(), key.cpu(), batch["text_key"].cpu()

    def score(self, task: nn.Module) -> dict[str, float]:
        with self.runner.scoring(task):
            parts = [self.runner.run(lambda b: self._embed(task, b), batch) for batch in self.loader]
        query, text, qkey, tkey = (torch.cat([p[i] for p in parts]) for i in range(4))
        names = ("q2d", "d2q") if self.text_only else ("i2t", "t2i")
        return pair_retrieval_metrics(query, text, (qkey, tkey), ks=tuple(task.hparams.recall_at), names=names)
