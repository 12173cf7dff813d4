"""Metrics of generated text: BLEU-4, ROUGE-L and chrF (torchmetrics), and VQA accuracy.

VQA accuracy is the normalized exact match of the VQA benchmark's answer processing (case,
punctuation, articles and number words do not count), written here because torchmetrics has none.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Optional, Sequence

from torchmetrics.text import BLEUScore, CHRFScore
from torchmetrics.text.rouge import ROUGEScore

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s.]|(?<!\d)\.|\.(?!\d)")  # keeps decimal points (3.5), drops other punctuation


def normalize_answer(text: str) -> str:
    """VQA answer normalization: lower case, no punctuation (decimals kept), number words as digits,
    no articles, single spaces. `"Two."` and `"2"` match; `"3.5 cm"` stays `"3.5 cm"`."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES)


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU-4, ROUGE-L (F-measure) and chrF of predictions against one reference each."""
    if not predictions:
        return {}
    refs = [[r] for r in references]
    bleu = BLEUScore(n_gram=4, smooth=True)(list(predictions), refs)
    rouge = ROUGEScore(rouge_keys=("rougeL",))(list(predictions), list(references))["rougeL_fmeasure"]
    chrf = CHRFScore()(list(predictions), refs)
    return {"bleu4": float(bleu), "rougeL": float(rouge), "chrf": float(chrf)}


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 answer_types: Optional[Sequence[Optional[str]]] = None) -> dict[str, float]:
    """Share of predictions whose normalized text equals a normalized accepted answer.

    Args:
        predictions: generated answers.
        answers: accepted answers of each question (any one counts).
        answer_types: e.g. `closed`/`open` per question; each type is also reported apart
            (`vqa_acc_closed`, `vqa_acc_open`).
    """
    if not predictions:
        return {}
    hits = [float(normalize_answer(p) in {normalize_answer(a) for a in accepted})
            for p, accepted in zip(predictions, answers)]
    out = {"vqa_acc": sum(hits) / len(hits)}
    if answer_types is not None:
        by_type: dict[str, list[float]] = defaultdict(list)
        for hit, kind in zip(hits, answer_types):
            if kind:
                by_type[str(kind).strip().lower()].append(hit)
        for kind, values in sorted(by_type.items()):
            out[f"vqa_acc_{kind}"] = sum(values) / len(values)
    return out
