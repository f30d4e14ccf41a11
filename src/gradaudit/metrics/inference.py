"""How well an inference attack's scores separate the answers: ROC, AUC, TPR at low FPR.

Pure functions on float64 scores. Membership inference is judged by its true-positive rate at a
low false-positive rate (Carlini et al., "Membership Inference Attacks From First Principles",
IEEE S&P 2022), not only by AUC or accuracy: an attack that is confidently right about a few
records is a real privacy failure even when its average-case accuracy is near chance.

Every rate comes with a 95 % interval: Clopper–Pearson for proportions (exact, conservative),
Hanley–McNeil for the AUC (Hanley and McNeil, "The meaning and use of the area under a receiver
operating characteristic (ROC) curve", Radiology 1982).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LOW_FPRS = (0.01, 0.001)
"""The false-positive rates at which the report gives the true-positive rate."""

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Roc:
    """A ROC curve: one point per distinct threshold, from (0, 0) to (1, 1).

    Attributes:
        fpr: false-positive rates, non-decreasing.
        tpr: true-positive rates, non-decreasing.
        positives: how many candidates are positives (members).
        negatives: how many are negatives (non-members).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    positives: int
    negatives: int


def _checked(scores: Sequence[float] | np.ndarray, truth: Sequence[bool] | np.ndarray):
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    if s.ndim != 1 or s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and truth {t.shape} must be equal-length vectors")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are not finite")
    if t.all() or not t.any():
        raise ValueError("a ROC needs at least one positive and one negative candidate")
    return s, t


def roc(scores: Sequence[float] | np.ndarray, truth: Sequence[bool] | np.ndarray) -> Roc:
    """The ROC of `scores` (higher means positive) against `truth`; tied scores form one step.

    Example:
        >>> r = roc([0.9, 0.8, 0.3, 0.1], [True, False, True, False])
        >>> r.fpr.tolist(), r.tpr.tolist()
        ([0.0, 0.0, 0.5, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0, 1.0])
    """
    s, t = _checked(scores, truth)
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tp = np.cumsum(t)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    pos, neg = int(t.sum()), int((~t).sum())
    return Roc(np.r_[0.0, fp / neg], np.r_[0.0, tp / pos], pos, neg)


def auc(scores: Sequence[float] | np.ndarray, truth: Sequence[bool] | np.ndarray) -> float:
    """The area under the ROC: the chance a random positive outscores a random negative, ties
    counting one half (the Mann–Whitney U statistic over the pair count).

    Example:
        >>> auc([3.0, 2.0, 1.0], [True, True, False]), auc([1.0, 1.0], [True, False])
        (1.0, 0.5)
    """
    s, t = _checked(scores, truth)
    ranks = stats.rankdata(s)  # average ranks for ties
    pos, neg = int(t.sum()), int((~t).sum())
    u = ranks[t].sum() - pos * (pos + 1) / 2
    return float(u / (pos * neg))


def auc_interval(value: float, positives: int, negatives: int) -> tuple[float, float]:
    """Hanley–McNeil's normal 95 % interval of an AUC, clipped to [0, 1]."""
    q1 = value / (2 - value)
    q2 = 2 * value**2 / (1 + value)
    var = (
        value * (1 - value) + (positives - 1) * (q1 - value**2) + (negatives - 1) * (q2 - value**2)
    ) / (positives * negatives)
    half = stats.norm.ppf(0.5 + CONFIDENCE / 2) * math.sqrt(max(var, 0.0))
    return max(0.0, value - half), min(1.0, value + half)


def clopper_pearson(successes: int, trials: int, confidence: float = CONFIDENCE):
    """The exact (Clopper–Pearson) two-sided interval of a binomial proportion.

    Example:
        >>> lo, hi = clopper_pearson(0, 10)
        >>> lo, round(hi, 4)
        (0.0, 0.3085)
    """
    if trials <= 0:
        raise ValueError("a proportion needs at least one trial")
    alpha = 1 - confidence
    lo = 0.0 if successes == 0 else stats.beta.ppf(alpha / 2, successes, trials - successes + 1)
    hi = (
        1.0
        if successes == trials
        else stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes)
    )
    return float(lo), float(hi)


def tpr_at_fpr(curve: Roc, fpr: float) -> float:
    """The highest true-positive rate at a threshold whose false-positive rate is ≤ `fpr`.

    With fewer than ``1 / fpr`` negatives the only such thresholds admit no false positive; see
    :func:`resolution_warnings`.
    """
    ok = curve.fpr <= fpr + 1e-12
    return float(curve.tpr[ok].max())


def best_advantage(curve: Roc) -> tuple[float, int]:
    """Yeom et al.'s membership advantage, max(TPR − FPR) over thresholds, and where it is."""
    gap = curve.tpr - curve.fpr
    at = int(np.argmax(gap))
    return float(gap[at]), at


def resolution_warnings(negatives: int, fprs: Sequence[float] = LOW_FPRS) -> list[str]:
    """Sentences for each false-positive rate too small to resolve with `negatives`."""
    out = []
    for rate in fprs:
        if negatives * rate < 1:
            out.append(
                f"only {negatives} non-members: a false-positive rate of {rate:g} needs at least "
                f"{math.ceil(1 / rate)}, so tpr_at_fpr_{rate:g} is the true-positive rate at "
                "zero false positives"
            )
    return out


def binary_metrics(
    scores: Sequence[float] | np.ndarray, truth: Sequence[bool] | np.ndarray
) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """The report's metrics of a yes/no inference, their 95 % intervals and warnings.

    Metrics: ``auc``; ``tpr_at_fpr_0.01`` and ``tpr_at_fpr_0.001``; ``balanced_accuracy`` and
    ``advantage`` (TPR − FPR) at the threshold that maximises them, the attacker's best case
    (the threshold is chosen on the scored records themselves, so both are optimistic).
    Intervals: Hanley–McNeil for the AUC; Clopper–Pearson on the true positives at the chosen
    threshold for the TPRs (the threshold's own uncertainty is not included); for the advantage
    and the balanced accuracy, the interval of TPR minus the interval of FPR.

    Example:
        >>> m, ci, warn = binary_metrics([0.9, 0.8, 0.7, 0.1], [True, True, False, False])
        >>> m["auc"], m["advantage"], m["balanced_accuracy"]
        (1.0, 1.0, 1.0)
    """
    s, t = _checked(scores, truth)
    curve = roc(s, t)
    pos, neg = curve.positives, curve.negatives
    value = auc(s, t)
    metrics = {"auc": value}
    intervals = {"auc": list(auc_interval(value, pos, neg))}
    for rate in LOW_FPRS:
        tpr = tpr_at_fpr(curve, rate)
        key = f"tpr_at_fpr_{rate:g}"
        metrics[key] = tpr
        intervals[key] = list(clopper_pearson(round(tpr * pos), pos))
    adv, at = best_advantage(curve)
    tp, fp = round(curve.tpr[at] * pos), round(curve.fpr[at] * neg)
    tpr_lo, tpr_hi = clopper_pearson(tp, pos)
    fpr_lo, fpr_hi = clopper_pearson(fp, neg)
    adv_ci = [max(-1.0, tpr_lo - fpr_hi), min(1.0, tpr_hi - fpr_lo)]
    metrics["advantage"] = adv
    metrics["balanced_accuracy"] = (1 + adv) / 2
    intervals["advantage"] = adv_ci
    intervals["balanced_accuracy"] = [(1 + adv_ci[0]) / 2, (1 + adv_ci[1]) / 2]
    return metrics, intervals, resolution_warnings(neg)


def choice_metrics(
    scores: np.ndarray, truth: np.ndarray, baseline: np.ndarray | None
) -> tuple[dict[str, float], dict[str, list[float]], list[str]]:
    """Accuracy of the highest-scored answer, the no-model baseline's accuracy and the gain.

    Without a `baseline` the baseline is the majority answer among the candidates (the best a
    guesser who knows only the answers' frequencies does). The accuracy's interval is
    Clopper–Pearson; the gain's is the accuracy's interval minus the baseline's value.

    Example:
        >>> s = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
        >>> m, _, _ = choice_metrics(s, np.array([0, 1, 1]), None)
        >>> round(m["accuracy"], 3), round(m["baseline_accuracy"], 3), round(m["gain"], 3)
        (0.667, 0.667, 0.0)
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=np.int64)
    if s.ndim != 2 or s.shape[0] != t.shape[0] or t.size == 0:
        raise ValueError(f"choice scores must be (N, K) with N = {t.size}; got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} scores are not finite")
    correct = int((s.argmax(axis=1) == t).sum())
    accuracy = correct / t.size
    if baseline is None:
        base = float(np.bincount(t).max() / t.size)
        how = "the majority answer"
    else:
        base = float((np.asarray(baseline) == t).mean())
        how = "a predictor that never saw the model"
    lo, hi = clopper_pearson(correct, t.size)
    metrics = {"accuracy": accuracy, "baseline_accuracy": base, "gain": accuracy - base}
    intervals = {"accuracy": [lo, hi], "gain": [lo - base, hi - base]}
    return metrics, intervals, [f"the baseline is {how}"]


__all__ = [
    "LOW_FPRS",
    "Roc",
    "auc",
    "auc_interval",
    "best_advantage",
    "binary_metrics",
    "choice_metrics",
    "clopper_pearson",
    "resolution_warnings",
    "roc",
    "tpr_at_fpr",
]
