"""Task metrics of generated text against grouped references, with bootstrap intervals.

E2E-style data has several references per prompt; a generation is scored against all of them
(corpus BLEU with sacrebleu, the E2E challenge's and the LoRA paper's BLEU; ROUGE-L F1 with
rouge-score, best over the references). GSM8K-style data ends its answer with `#### <number>`:
exact match compares that number with the generation's final answer.

Scores are on a 0-100 scale. `bootstrap` resamples prompts (never single references), so an
interval reflects how many distinct prompts were evaluated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("bleu", "rouge_l", "exact_match")

# --------------------------------------------------------------------------- BLEU


@dataclass(frozen=True)
class BleuStats:
    """Sufficient statistics of one segment: summing them over segments gives corpus BLEU."""

    correct: tuple[int, ...]
    total: tuple[int, ...]
    sys_len: int
    ref_len: int


def bleu_stats(hypothesis: str, references: Sequence[str]) -> BleuStats:
    from sacrebleu.metrics import BLEU

    if not references:
        raise ValueError("a generation needs at least one reference")
    score = BLEU().corpus_score([hypothesis], [[r] for r in references])
    return BleuStats(tuple(score.counts), tuple(score.totals), score.sys_len, score.ref_len)


def corpus_bleu_from(stats: Sequence[BleuStats]) -> float:
    """Corpus BLEU (sacrebleu's default: 13a tokens, no smoothing) from segment statistics."""
    from sacrebleu.metrics import BLEU

    if not stats:
        return float("nan")
    correct = [sum(s.correct[i] for s in stats) for i in range(4)]
    total = [sum(s.total[i] for s in stats) for i in range(4)]
    sys_len = sum(s.sys_len for s in stats)
    ref_len = sum(s.ref_len for s in stats)
    return float(BLEU.compute_bleu(correct, total, sys_len, ref_len).score)


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    _check(hypotheses, references)
    return corpus_bleu_from([bleu_stats(h, r) for h, r in zip(hypotheses, references, strict=True)])


# --------------------------------------------------------------------------- ROUGE-L


def rouge_l(hypothesis: str, references: Sequence[str]) -> float:
    """ROUGE-L F1 (x100) against the closest reference (rouge-score's `score_multi`)."""
    from rouge_score import rouge_scorer

    if not references:
        raise ValueError("a generation needs at least one reference")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return 100.0 * float(scorer.score_multi(list(references), hypothesis)["rougeL"].fmeasure)


# --------------------------------------------------------------------------- exact match

_FINAL = re.compile(r"####\s*(.+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text: str) -> str | None:
    """The answer after `####` if present, else the last number in `text`; commas, `$` and a
    trailing `.0` removed. None if there is no number at all."""
    m = _FINAL.search(text)
    tail = m.group(1) if m else text
    numbers = _NUMBER.findall(tail if m else text)
    if not numbers:
        return None
    value = (numbers[0] if m else numbers[-1]).replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", value):
        value = value.split(".")[0]
    return value


def exact_match(hypothesis: str, references: Sequence[str]) -> float:
    """100 if the generation's final answer equals any reference's, else 0."""
    got = final_answer(hypothesis)
    wanted = {final_answer(r) for r in references} - {None}
    return 100.0 if got is not None and got in wanted else 0.0


# --------------------------------------------------------------------------- scoring a set


@dataclass
class Scored:
    """Per-prompt scores of one set of generations; `value(metric, idx)` re-scores a resample."""

    n: int
    bleu: list[BleuStats]
    rouge_l: list[float]
    exact_match: list[float]

    def value(self, metric: str, idx: Sequence[int] | np.ndarray | None = None) -> float:
        pick = range(self.n) if idx is None else idx
        if metric == "bleu":
            return corpus_bleu_from([self.bleu[i] for i in pick])
        values = self.rouge_l if metric == "rouge_l" else self.exact_match
        chosen = [values[i] for i in pick]
        return float(np.mean(chosen)) if chosen else float("nan")


def score(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics: Sequence[str]
) -> Scored:
    """Score each generation against its prompt's references; metrics not asked for stay empty."""
    _check(hypotheses, references)
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown task metric(s) {unknown}; expected some of {list(METRICS)}")
    pairs = list(zip(hypotheses, references, strict=True))
    return Scored(
        len(pairs),
        [bleu_stats(h, r) for h, r in pairs] if "bleu" in metrics else [],
        [rouge_l(h, r) for h, r in pairs] if "rouge_l" in metrics else [],
        [exact_match(h, r) for h, r in pairs] if "exact_match" in metrics else [],
    )


def bootstrap(
    stat: Callable[[np.ndarray], float], n: int, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of `stat(indices)` over `resamples` resamples of n items."""
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(resamples)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} generations for {len(references)} reference groups")
