"""romscale.eval.metrics: exact values on small cases, every script kept by ROUGE-L."""

from __future__ import annotations

import pytest

from romscale.data.taskbank import METRIC_NAMES
from romscale.errors import RomscaleError
from romscale.eval.metrics import METRICS, ScriptTokenizer, normalize, score, score_examples


def test_registry_matches_the_bank_format():
    assert sorted(METRICS) == sorted(METRIC_NAMES)


def test_normalize():
    assert normalize("  Hello,   WORLD!! ") == "hello world"
    assert normalize("Straße") == "strasse"  # casefold
    assert normalize("ＡＢＣ１２３") == "abc123"  # NFKC: full-width forms
    assert normalize("«Привет»\n—мир.") == "привет мир"


def test_exact_match():
    assert score_examples("exact_match", ["Abandoned.", "abandoned\nmore text", "abandon", ""], ["abandoned"] * 4) == [
        100.0, 100.0, 0.0, 0.0]
    assert score("exact_match", ["does he need assistance?", "he needs"], ["does he need assistance", "he needs"]) == 100.0


def test_accuracy_first_line_or_first_word():
    preds = ["Positive", "positive.", "negative: the food was cold", "\n  Neutral\n", "I think positive", "pos"]
    refs = ["positive", "positive", "negative", "neutral", "positive", "positive"]
    assert score_examples("accuracy", preds, refs, labels=["positive", "negative", "neutral"]) == [
        100.0, 100.0, 100.0, 100.0, 0.0, 0.0]
    assert score("accuracy", ["comp.graphics is my answer"], ["comp.graphics"]) == 100.0
    with pytest.raises(RomscaleError, match="not one of the labels"):
        score("accuracy", ["x"], ["other"], labels=["positive"])


def test_rouge_l_exact_values():
    assert score("rougeL", ["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(200 / 3)
    assert score("rougeL", ["completely different"], ["the cat sat"]) == 0.0
    assert score("rougeL", ["猫坐在"], ["猫坐在垫子上"]) == pytest.approx(200 / 3)  # one token per Han character


@pytest.mark.parametrize("text", ["Кошка сидит на ковре.", "猫坐在垫子上。", "猫がマットの上に座っている。", "Ο γάτος κάθεται."])
def test_rouge_l_keeps_every_script(text):
    from rouge_score import rouge_scorer

    assert score("rougeL", [text], [text]) == pytest.approx(100.0)
    # the reason for the custom tokenizer: rouge-score's default drops non-Latin text entirely
    default = rouge_scorer.RougeScorer(["rougeL"]).score(text, text)["rougeL"].fmeasure
    assert default == 0.0


def test_script_tokenizer():
    assert ScriptTokenizer().tokenize("Привет, мир! 你好 こんにちは Hello-World") == [
        "привет", "мир", "你", "好", "こ", "ん", "に", "ち", "は", "hello", "world"]


def test_chrf():
    assert score("chrf", ["Zurück zur Übersicht"], ["Zurück zur Übersicht"]) == pytest.approx(100.0)
    assert score("chrf", [""], ["Zurück zur Übersicht"]) == 0.0
    near, far = score_examples("chrf", ["Zurück zur Übersich", "Hallo"], ["Zurück zur Übersicht"] * 2)
    assert 50.0 < near < 100.0 and far < near
    assert 0.0 < score("chrf", ["保存して続ける"], ["保存して編集を続ける"]) < 100.0


def test_errors():
    with pytest.raises(RomscaleError, match="unknown metric 'bleu'"):
        score("bleu", ["a"], ["a"])
    with pytest.raises(RomscaleError, match="2 predictions for 1 references"):
        score_examples("chrf", ["a", "b"], ["a"])
    with pytest.raises(RomscaleError, match="no examples"):
        score("exact_match", [], [])
