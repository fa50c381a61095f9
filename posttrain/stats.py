"""Bootstrap confidence intervals and the per-prompt win rate (win 1 / tie 0.5 / loss 0, as AlpacaEval counts)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def ratio_ppl_ci(nll_sums, token_counts, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval, resampling items (e.g. held-out responses), of the corpus perplexity
    exp(sum of negative log-likelihoods / sum of tokens)."""
    nll, n = np.asarray(nll_sums, dtype=float), np.asarray(token_counts, dtype=float)
    if nll.size == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, nll.size, size=(n_boot, nll.size))
    ppl = np.exp(nll[idx].sum(axis=1) / n[idx].sum(axis=1))
    lo, hi = np.quantile(ppl, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def win(score: float, ref: float) -> float:
    """1 where a score beats the reference's, 0.5 on a tie, 0 on a loss."""
    return 1.0 if score > ref else 0.5 if score == ref else 0.0


def win_values(scores: list[float], ref_scores: list[float]) -> list[float]:
    """Per prompt: 1 where the model's gold score beats the reference's, 0.5 on a tie, 0 on a loss."""
    return [win(a, b) for a, b in zip(scores, ref_scores, strict=True)]


def summarise(answers: list[dict], n_boot: int, seed: int) -> dict:
    """Gold pass rate, mean gold score (each with its 95% interval), mean length, pass rate per task."""
    passed = [float(a["passed"]) for a in answers]
    scores = [a["score"] for a in answers]
    by_task = defaultdict(list)
    for a in answers:
        by_task[a["task"]].append(float(a["passed"]))
    return {"n": len(answers),
            "pass_rate": sum(passed) / len(passed), "pass_rate_ci": bootstrap_ci(passed, n_boot, seed),
            "mean_score": sum(scores) / len(scores), "mean_score_ci": bootstrap_ci(scores, n_boot, seed),
            "mean_length": sum(a["length"] for a in answers) / len(answers),
            "pass_rate_by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}}


def paired_gain(candidate: dict[str, float], champion: dict[str, float], n_boot: int, seed: int,
                level: float = 0.95) -> tuple[float, float, float]:
    """Mean of candidate - champion over the same prompt ids, and its paired bootstrap interval (resampling
    prompts, so what both models find easy or hard cancels)."""
    if candidate.keys() != champion.keys():
        raise ValueError("the two models answered different prompts: no paired comparison")
    diffs = [candidate[i] - champion[i] for i in sorted(candidate)]
    lo, hi = bootstrap_ci(diffs, n_boot, seed, level)
    return sum(diffs) / len(diffs), lo, hi
