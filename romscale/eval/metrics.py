"""Task metrics, one registry: every score is per example and in 0..100.

- exact_match: the prediction's first non-empty line equals the target after `normalize`.
- accuracy: the prediction's first non-empty line, or its first word, equals the label after `normalize`.
- rougeL: ROUGE-L F1 (rouge-score) with `ScriptTokenizer`, which keeps every script; rouge-score's
  default tokenizer keeps only [a-z0-9], so Russian, Chinese or Japanese text would score 0.
- chrf: sentence-level chrF (sacrebleu, default settings: character 6-grams, beta 2).

rouge-score and sacrebleu are imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

from romscale.errors import RomscaleError


def normalize(text: str) -> str:
    """NFKC, casefold, punctuation and symbols dropped, whitespace collapsed and stripped."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c)[0] in "PSZC" else c for c in text)
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The first line of `text` that holds more than whitespace ('' when none does)."""
    return next((line for line in text.splitlines() if line.strip()), "")


# Scripts written without spaces between words: each character is one token (as CJK ROUGE does).
_CHAR_SCRIPTS = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CHAR_SCRIPTS}]|[^\W{_CHAR_SCRIPTS}]+")


class ScriptTokenizer:
    """rouge-score tokenizer object (`tokenize(text) -> list[str]`): NFKC + casefold, then Unicode word
    characters in runs, except Thai, kana and Han characters, which are one token each."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=ScriptTokenizer())


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def _exact_match(pred: str, ref: str, labels: Sequence[str] | None) -> float:
    return 100.0 if normalize(first_line(pred)) == normalize(ref) else 0.0


def _accuracy(pred: str, ref: str, labels: Sequence[str] | None) -> float:
    if labels is not None and ref not in labels:
        raise RomscaleError(f"accuracy: reference {ref!r} is not one of the labels {list(labels)}")
    line = first_line(pred).strip()
    want = normalize(ref)
    words = line.split()
    return 100.0 if normalize(line) == want or (words and normalize(words[0]) == want) else 0.0


def _rouge_l(pred: str, ref: str, labels: Sequence[str] | None) -> float:
    return 100.0 * _rouge().score(ref, pred.strip())["rougeL"].fmeasure


def _chrf_score(pred: str, ref: str, labels: Sequence[str] | None) -> float:
    return float(_chrf().sentence_score(pred.strip(), [ref]).score)


@dataclass(frozen=True)
class Metric:
    name: str
    score: Callable[[str, str, Sequence[str] | None], float]  # (prediction, reference, labels) -> 0..100
    description: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", _accuracy, "label accuracy: first line (or its first word) equals the label, normalised"),
    Metric("chrf", _chrf_score, "sentence chrF (sacrebleu)"),
    Metric("exact_match", _exact_match, "first line equals the target after NFKC, casefold, punctuation and space removal"),
    Metric("rougeL", _rouge_l, "ROUGE-L F1 (rouge-score) with a tokenizer that keeps every script"),
)}


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise RomscaleError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}") from None


def score_examples(metric: str, predictions: Sequence[str], references: Sequence[str],
                   labels: Sequence[str] | None = None) -> list[float]:
    """One score in 0..100 per (prediction, reference) pair."""
    m = get_metric(metric)
    if len(predictions) != len(references):
        raise RomscaleError(f"{metric}: {len(predictions)} predictions for {len(references)} references")
    return [m.score(p, r, labels) for p, r in zip(predictions, references)]


def score(metric: str, predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """The mean of `score_examples` (0..100); an empty list raises."""
    scores = score_examples(metric, predictions, references, labels)
    if not scores:
        raise RomscaleError(f"{metric}: no examples to score")
    return sum(scores) / len(scores)
