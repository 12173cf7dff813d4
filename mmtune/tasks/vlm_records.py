"""What a vision-language task keeps per sample at evaluation, the text metrics those records give, and
the predictions file: free functions, so the task keeps only the steps (and other VLM tasks can share them)."""

from __future__ import annotations

import json
from pathlib import Path

from mmtune.files import atomic_write
from mmtune.metrics.records import SampleRecord
from mmtune.metrics.text import text_metrics, vqa_accuracy


def sample_records(seen: dict[str, dict]) -> list[SampleRecord]:
    """One record per scored sample (`{id: {"sample", "prediction", "stats"}}`): the generated text (None
    where it did not generate), the reference, the loss stats and the sample's metadata (accepted answers
    and answer type for VQA, images, group, the row's other columns)."""
    records = []
    for sid, entry in seen.items():
        s = entry["sample"]
        meta = {**s.meta, "answers": list(s.answers), "answer_type": s.answer_type, "images": list(s.images),
                **({"group": s.group} if s.group is not None else {})}
        records.append(SampleRecord(id=sid, target=s.reference, prediction=entry.get("prediction"),
                                    stats=dict(entry.get("stats") or {}), meta=meta))
    return records


def generation_metrics(rows: list[SampleRecord], vqa: bool) -> dict[str, float]:
    """Text metrics of generated rows against their references; VQA accuracy (by answer type where the
    rows have types) when the split is VQA."""
    metrics = text_metrics([r.prediction for r in rows], [r.target for r in rows])
    if vqa:
        types = [r.meta["answer_type"] for r in rows]
        metrics.update(vqa_accuracy([r.prediction for r in rows], [r.meta["answers"] or [r.target] for r in rows],
                                    types if any(types) else None))
    return metrics


def write_predictions(target: Path, rows: list[SampleRecord]) -> None:
    """JSONL of id, reference, prediction (and answer type), written whole or not at all."""
    with atomic_write(target) as f:
        for r in rows:
            answer_type = r.meta.get("answer_type")
            f.write(json.dumps({"id": r.id, "reference": r.target, "prediction": r.prediction,
                                **({"answer_type": answer_type} if answer_type else {})}) + "\n")
