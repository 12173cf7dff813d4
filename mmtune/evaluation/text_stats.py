"""Per-sample statistics of generated text whose sums give the corpus BLEU-4 and chrF exactly.

Corpus BLEU and chrF are not means of sentence scores: they are functions of n-gram counts summed
over the corpus. Keeping each sample's counts makes a bootstrap resample (a weighted sum of the
counts) give exactly the score torchmetrics would compute on that resample, at the cost of one
matrix product instead of a thousand corpus passes. The definitions follow torchmetrics'
`BLEUScore(n_gram=4, smooth=True)` and `CHRFScore()` (chrF++: character 6-grams and word 2-grams,
beta 2, spaces removed); a test checks both against torchmetrics.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

BLEU_ORDER = 4
CHRF_ORDER = 6
CHRF_WORD_ORDER = 2
CHRF_BETA = 2.0
_PUNCTUATION = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
_EPS = 1e-16  # torchmetrics' chrF smoothing of the F-score denominator


def _ngrams(tokens, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu_stats(prediction: str, reference: str) -> np.ndarray:
    """[matches_1..4, totals_1..4, prediction length, reference length] of one sample."""
    pred, ref = prediction.split(), reference.split()
    matches = [sum((_ngrams(pred, n) & _ngrams(ref, n)).values()) for n in range(1, BLEU_ORDER + 1)]
    totals = [max(len(pred) - n + 1, 0) for n in range(1, BLEU_ORDER + 1)]
    return np.array(matches + totals + [len(pred), len(ref)], dtype=np.float64)


def bleu_from_stats(summed: np.ndarray) -> np.ndarray:
    """Corpus BLEU-4 (smoothed as torchmetrics does) from [B, 10] summed `bleu_stats`."""
    summed = np.atleast_2d(summed)
    matches, totals = summed[:, :BLEU_ORDER], summed[:, BLEU_ORDER:2 * BLEU_ORDER]
    pred_len, ref_len = summed[:, -2], summed[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = (matches + 1.0) / (totals + 1.0)
        precision[:, 0] = matches[:, 0] / totals[:, 0]
        geo = np.exp(np.log(precision).mean(axis=1))
        brevity = np.where(pred_len > ref_len, 1.0, np.exp(1.0 - ref_len / pred_len))
        score = brevity * geo
    return np.where(matches.min(axis=1) == 0, 0.0, score)


def _chars(text: str) -> list[str]:
    return list(text.strip().replace(" ", ""))


def _words(text: str) -> list[str]:
    """Words with a leading or trailing punctuation mark split off (chrF++'s word tokens)."""
    out = []
    for word in text.strip().split():
        if len(word) > 1 and word[-1] in _PUNCTUATION:
            out += [word[:-1], word[-1]]
        elif len(word) > 1 and word[0] in _PUNCTUATION:
            out += [word[0], word[1:]]
        else:
            out.append(word)
    return out


def _orders() -> list[tuple]:
    return [(_chars, n) for n in range(1, CHRF_ORDER + 1)] + [(_words, n) for n in range(1, CHRF_WORD_ORDER + 1)]


def chrf_stats(prediction: str, reference: str) -> np.ndarray:
    """[matches, prediction n-grams, reference n-grams] for character 1..6- and word 1..2-grams of one
    sample (3 x 8 numbers)."""
    matches, hyp, tgt = [], [], []
    for split, n in _orders():
        p, r = _ngrams(split(prediction), n), _ngrams(split(reference), n)
        matches.append(sum((p & r).values()))
        hyp.append(sum(p.values()))
        tgt.append(sum(r.values()))
    stats = np.array(matches + hyp + tgt, dtype=np.float64)
    if chrf_from_stats(stats)[0] == 0.0:
        # torchmetrics keeps a reference's statistics only when it scores above 0 (its best-reference
        # search starts at 0), so a sentence without any match adds its prediction n-grams alone.
        stats[2 * len(matches):] = 0.0
    return stats


def chrf_from_stats(summed: np.ndarray) -> np.ndarray:
    """Corpus chrF++ (0-1, as torchmetrics reports it) from [B, 24] summed `chrf_stats`."""
    summed = np.atleast_2d(summed)
    k = CHRF_ORDER + CHRF_WORD_ORDER
    matches, hyp, ref = summed[:, :k], summed[:, k:2 * k], summed[:, 2 * k:]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(hyp > 0, matches / hyp, 0.0)
        recall = np.where(ref > 0, matches / ref, 0.0)
    b2 = CHRF_BETA ** 2
    f = (1 + b2) * precision * recall / np.maximum(b2 * precision + recall, _EPS)
    return f.sum(axis=1) / k


def rouge_l(prediction: str, reference: str) -> float:
    """Sentence ROUGE-L F-measure as torchmetrics' `ROUGEScore` computes it (its corpus value is the
    mean of these)."""
    from torchmetrics.functional.text.rouge import rouge_score

    return float(rouge_score(prediction, reference, rouge_keys="rougeL")["rougeL_fmeasure"])
