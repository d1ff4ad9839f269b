"""Task metrics against hand-worked values and against the libraries they wrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedpeat.metrics import (
    bootstrap,
    corpus_bleu,
    exact_match,
    final_answer,
    rouge_l,
    score,
)


def test_bleu_hand_worked_brevity_penalty() -> None:
    # Every n-gram of "a b c d" is in the reference: precisions 4/4, 3/3, 2/2, 1/1; the reference
    # is 5 tokens, the hypothesis 4: BP = exp(1 - 5/4), BLEU = 100 * BP.
    assert corpus_bleu(["a b c d"], [["a b c d e"]]) == pytest.approx(100 * math.exp(-0.25))


def test_bleu_takes_the_closest_reference_length_and_clips_over_all_references() -> None:
    # The 4-token reference sets the length (BP = 1); n-grams are matched against the 5-token one.
    assert corpus_bleu(["a b c d"], [["a b c d e", "a b c x"]]) == pytest.approx(100.0)
    # A wrong word: unigrams 3/4, bigrams 1/3 ("a b"), no trigram: BLEU 0 without smoothing.
    assert corpus_bleu(["a b x d"], [["a b c d"]]) == 0.0


def test_corpus_bleu_equals_sacrebleu_on_ragged_references() -> None:
    from sacrebleu.metrics import BLEU

    hyps = ["the cat sat on the mat", "there is a dog in the park today", "hello world"]
    refs = [
        ["the cat sat on a mat", "a cat was sitting on the mat"],
        ["a dog is in the park today"],
        ["hello there world", "hello world !", "hi world"],
    ]
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(3)]
    expected = BLEU().corpus_score(hyps, streams).score
    assert corpus_bleu(hyps, refs) == pytest.approx(expected)


def test_rouge_l_hand_worked_and_best_reference() -> None:
    # LCS of "a b c d" and "a x c d" is "a c d": P = R = 3/4, F1 = 0.75.
    assert rouge_l("a b c d", ["a x c d"]) == pytest.approx(75.0)
    # The closer reference wins: "a b c d" matches fully.
    assert rouge_l("a b c d", ["a x c d", "a b c d"]) == pytest.approx(100.0)
    # P = 2/2, R = 2/4: F1 = 2 * 1 * 0.5 / 1.5.
    assert rouge_l("a b", ["a b c d"]) == pytest.approx(100 * 2 / 3)


def test_rouge_l_equals_rouge_score() -> None:
    from rouge_score import rouge_scorer

    hyp, ref = "the quick brown fox jumps", "a quick brown dog jumps high"
    expected = rouge_scorer.RougeScorer(["rougeL"]).score(ref, hyp)["rougeL"].fmeasure
    assert rouge_l(hyp, [ref]) == pytest.approx(100 * expected)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("She has 3 apples.\n#### 42", "42"),
        ("#### 1,234", "1234"),
        ("so the total is $18.00", "18"),
        ("first 3 then 7 so 10", "10"),
        ("#### -5", "-5"),
        ("no number here", None),
    ],
)
def test_final_answer(text: str, answer: str | None) -> None:
    assert final_answer(text) == answer


def test_exact_match() -> None:
    refs = ["Natalia sold 48/2 = 24 clips in May.\n#### 72"]
    assert exact_match("48 + 24 = 72. The answer is 72", refs) == 100.0
    assert exact_match("#### 71", refs) == 0.0
    assert exact_match("I do not know", refs) == 0.0


def test_score_resamples_prompts() -> None:
    scored = score(["a b c d", "x y"], [["a b c d"], ["p q"]], ["bleu", "rouge_l"])
    assert scored.n == 2
    assert scored.value("rouge_l") == pytest.approx(50.0)
    assert scored.value("rouge_l", [0, 0]) == pytest.approx(100.0)
    assert scored.value("bleu", [0]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="unknown task metric"):
        score(["a"], [["a"]], ["meteor"])
    with pytest.raises(ValueError, match="2 generations for 1"):
        score(["a", "b"], [["a"]], ["bleu"])


def test_bootstrap_interval() -> None:
    values = np.arange(10, dtype=float)
    lo, hi = bootstrap(lambda idx: float(values[idx].mean()), 10, resamples=2000, seed=0)
    assert lo < 4.5 < hi
    # Standard error of the mean is 2.87 / sqrt(10) = 0.91: the interval is about +-1.8.
    assert 2.5 < hi - lo < 4.5
    assert bootstrap(lambda idx: 3.0, 5) == (3.0, 3.0)
