"""The report's example sections: sample generations beside their references (generation records),
the hardest texts (language-model records) and preference pairs (preference records), and the
retrieval queries with the worst ranks (retrieval records). All from `records/test.jsonl`."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from mmtune.evaluation import text_stats
from mmtune.evaluation.report.classification import thumbnail_html
from mmtune.evaluation.report.collect import RunData
from mmtune.evaluation.report.html import Raw, Section, esc, fmt, note, table
from mmtune.metrics.records import SampleRecord
from mmtune.metrics.text import normalize_answer

SHOWN = 8  # rows per example table
SCORED = 2000  # generations scored for "the weakest" (ROUGE-L per sample is not free)
PROMPT_KEYS = ("prompt", "question", "instruction", "input", "query")
HIDDEN_META = {"images", "path", "image", "answers", "direction"}
TEXT_KINDS = ("generation", "language_model", "preference")


def _text(value: Any, limit: int = 600) -> Raw:
    text = "" if value is None else str(value)
    text = text if len(text) <= limit else text[:limit] + " …"
    return Raw(f'<div class="text">{esc(text)}</div>')


def _meta(r: SampleRecord, skip: tuple = ()) -> str:
    """The record's short metadata columns as `key: value` lines."""
    pairs = [(k, v) for k, v in r.meta.items() if k not in HIDDEN_META and k not in skip
             and isinstance(v, (str, int, float)) and v not in ("", None)]
    return "; ".join(f"{k}: {v}" for k, v in pairs)[:240]


def _prompt(r: SampleRecord) -> Any:
    return next((r.meta[k] for k in PROMPT_KEYS if r.meta.get(k)), None)


def samples_section(run: RunData) -> Section:
    section = Section("samples", "Sample outputs")
    if run.records is None:
        section.missing = "sample outputs (no test records: run `mmtune test`)"
        return section
    if run.kind not in TEXT_KINDS:
        section.not_applicable = f"sample outputs are shown for text tasks; these are {run.kind} records"
        return section
    build = {"generation": _generations, "language_model": _hardest_texts, "preference": _preference_pairs}[run.kind]
    section.body = build(run)
    return section


def _generations(run: RunData) -> str:
    records = [r for r in run.records.records if r.prediction is not None]
    if not records:
        return _hardest_texts(run, "No generations were recorded (the test scored the token loss only). ")
    vqa = any(r.meta.get("answers") for r in records)
    pool = records if len(records) <= SCORED else random.Random(0).sample(records, SCORED)

    def score(r: SampleRecord) -> float:
        if vqa:
            accepted = {normalize_answer(a) for a in (r.meta.get("answers") or [r.target or ""])}
            return float(normalize_answer(str(r.prediction)) in accepted)
        return float(text_stats.rouge_l(str(r.prediction), str(r.target or "")))

    scored = sorted(((score(r), i, r) for i, r in enumerate(pool)), key=lambda t: (t[0], t[1]))
    measure = "answer accepted" if vqa else "ROUGE-L"
    has_images = any(r.meta.get("images") or r.meta.get("path") for r in records)
    missing: list[str] = []

    def rows(chosen: list[tuple[float, int, SampleRecord]]) -> list[list]:
        out = []
        for s, _, r in chosen:
            row = [Raw(thumbnail_html(r.meta, run.run_dir, missing, "thumb"))] if has_images else []
            question = _prompt(r)
            first = _text(question) if question else Raw(f'<span class="note muted">{esc(r.id)}</span>')
            out.append(row + [first, _text(r.prediction), _text(r.target), ("yes" if s else "no") if vqa else fmt(s, 3)])
        return out

    header = (["image"] if has_images else []) + ["prompt / sample", "generated", "reference", measure]
    numeric = [len(header) - 1]
    seeded = random.Random(0).sample(scored, min(SHOWN, len(scored)))
    parts = [note(f"{len(records)} test samples generated; {measure} per sample"
                  + (f" (the weakest are sought among a seeded {SCORED})" if len(pool) < len(records) else "") + "."),
             "<h3>A seeded sample</h3>", table(header, rows(seeded), numeric=numeric),
             f"<h3>The weakest by {measure}</h3>", table(header, rows(scored[:SHOWN]), numeric=numeric)]
    if missing:
        parts.insert(1, note(f"{len(missing)} image file(s) could not be shown: " + ", ".join(missing[:3]), "warn"))
    return "".join(parts)


def _hardest_texts(run: RunData, lead: str = "") -> str:
    rows = []
    for r in run.records.records:
        tokens = r.stats.get("tokens")
        if tokens:
            rows.append((r.stats.get("loss_sum", 0.0) / tokens, int(tokens), r))
    if not rows:
        return note(lead + "The records hold no per-sample loss or text to show.")
    rows.sort(key=lambda t: -t[0])
    body = [[_text(r.id, 120), _text(_prompt(r) or _meta(r) or "–", 300), fmt(n), fmt(loss, 3),
             fmt(float(np.exp(min(loss, 50.0))), 2)] for loss, n, r in rows[:SHOWN]]
    return (note(lead + f"{len(rows)} test samples scored by per-token loss; the hardest {len(body)} for the tuned "
                        "model (the samples' text is in the data file each id names).")
            + table(["sample", "columns", "tokens", "loss per token", "perplexity"], body, numeric=[2, 3, 4]))


def _preference_pairs(run: RunData) -> str:
    records = [r for r in run.records.records if r.stats.get("reward_margin") is not None]
    if not records:
        return note("The records hold no reward margins to show.")
    records.sort(key=lambda r: r.stats["reward_margin"])
    wrong = sum(1 for r in records if r.stats.get("accuracy", 1.0) < 0.5)

    def row(r: SampleRecord) -> list:
        right = r.stats.get("accuracy")
        verdict = Raw('<span class="badge good">chosen preferred</span>' if right and right >= 0.5 else
                      '<span class="badge bad">rejected preferred</span>')
        return [_text(r.id, 120), _text(_prompt(r) or _meta(r) or "–", 240),
                _text(r.meta.get("chosen"), 240) if r.meta.get("chosen") else "–",
                _text(r.meta.get("rejected"), 240) if r.meta.get("rejected") else "–",
                fmt(r.stats["reward_margin"], 3), fmt(r.stats.get("loss"), 3), verdict]

    header = ["pair", "prompt / columns", "chosen", "rejected", "reward margin", "loss", "verdict"]
    return (note(f"{len(records)} test pairs; the model rewards the rejected reply higher on {wrong}. The pairs with "
                 "the smallest reward margin (chosen minus rejected) first.")
            + table(header, [row(r) for r in records[:SHOWN]], numeric=[4, 5]))


def retrieval_section(run: RunData) -> Section:
    section = Section("retrieval", "Retrieval examples")
    if run.records is None:
        section.missing = "retrieval examples (no test records: run `mmtune test`)"
        return section
    if run.kind != "retrieval":
        section.not_applicable = f"retrieval examples are shown for aligners; these are {run.kind} records"
        return section
    by_direction: dict[str, list[SampleRecord]] = {}
    for r in run.records.records:
        by_direction.setdefault(str(r.meta.get("direction")), []).append(r)
    parts = []
    missing: list[str] = []
    for direction, records in by_direction.items():
        ranks = np.array([r.stats.get("rank", np.nan) for r in records], dtype=np.float64)
        finite = ranks[np.isfinite(ranks)]
        summary = (f"{len(records)} queries; found first for {np.mean(finite == 0):.0%}, within 5 for "
                   f"{np.mean(finite < 5):.0%}; median rank {np.median(finite) + 1:.0f}") if len(finite) else \
            f"{len(records)} queries without ranks"
        worst = sorted(records, key=lambda r: -float(r.stats.get("rank", -1)))[:SHOWN]
        image_queries = direction.startswith(("image", "i2"))
        body = []
        for r in worst:
            query: Any
            if image_queries and (r.meta.get("path") or r.meta.get("images")):
                query = Raw(thumbnail_html(r.meta, run.run_dir, missing, "thumb"))
            else:
                query = _text(r.meta.get("text") or r.meta.get("query") or r.id, 300)
            expected = (_text(r.meta.get("text"), 200) if image_queries and r.meta.get("text") else
                        _text(r.meta.get("path") or r.meta.get("positive") or "–", 200))
            body.append([query, expected, fmt(int(r.stats["rank"]) + 1) if "rank" in r.stats else "–",
                         _text(_meta(r, ("text", "query", "positive")) or "–", 160)])
        parts.append(f"<h3>{esc(direction)}</h3>" + note(summary + ". The queries whose match ranked lowest:")
                     + table(["query", "its match", "rank of the match", "columns"], body, numeric=[2]))
    if missing:
        parts.insert(0, note(f"{len(missing)} image file(s) could not be shown: " + ", ".join(missing[:3]), "warn"))
    section.body = "".join(parts)
    return section
