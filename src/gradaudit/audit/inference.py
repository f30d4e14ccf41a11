"""Score an inference attack against its challenge's private truth and save per-record scores."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from gradaudit.audit.io import atomic_write_bytes
from gradaudit.metrics.inference import binary_metrics, choice_metrics, roc
from gradaudit.threat.challenge import Challenge

ROC_POINTS = 200
"""Most ROC points kept in the report per attack (the low-FPR end is kept in full)."""


def score_inference(scores: np.ndarray, challenge: Challenge) -> dict[str, Any]:
    """The report fields of an inference attack's `scores` on `challenge`.

    Returns:
        ``metrics``, ``intervals`` (95 %), ``notes`` and, for a yes/no question, ``roc`` (a
        thinned list of ``[fpr, tpr]`` points for the log–log plot).

    Raises:
        ValueError: the scores' shape does not fit the challenge, or a score is not finite.
    """
    scores = np.asarray(scores, dtype=np.float64)
    expected = (len(challenge.truth),) if challenge.kind == "binary" else None
    if expected is not None and scores.shape != expected:
        raise ValueError(f"the attack returned scores {scores.shape}, expected {expected}")
    if challenge.kind == "binary":
        metrics, intervals, notes = binary_metrics(scores, challenge.truth)
        curve = roc(scores, challenge.truth)
        out = {"roc": thin_roc(curve.fpr, curve.tpr)}
        yes, no = (
            ("members", "non_members")
            if challenge.question == "membership"
            else (
                "positives",
                "negatives",
            )
        )
        counts = {yes: curve.positives, no: curve.negatives}
    else:
        metrics, intervals, notes = choice_metrics(scores, challenge.truth, challenge.baseline)
        out = {}
        counts = {"candidates": len(challenge.truth), "answers": int(scores.shape[1])}
    return {
        "metrics": metrics,
        "intervals": intervals,
        "notes": [*challenge.notes, *notes],
        "candidates": counts,
        **out,
    }


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, points: int = ROC_POINTS) -> list[list[float]]:
    """At most about `points` ROC points, spaced evenly in log FPR so the low end survives.

    Example:
        >>> thin_roc(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0]))
        [[0.0, 0.0], [0.5, 0.8], [1.0, 1.0]]
    """
    if len(fpr) <= points:
        return [[float(f), float(t)] for f, t in zip(fpr, tpr, strict=True)]
    smallest = float(fpr[fpr > 0].min())
    grid = np.geomspace(smallest, 1.0, points)
    keep = {0, len(fpr) - 1}
    keep.update(int(i) for i in np.searchsorted(fpr, grid, side="right") - 1)
    return [[float(fpr[i]), float(tpr[i])] for i in sorted(keep)]


def scores_csv(scores: np.ndarray, challenge: Challenge) -> bytes:
    """One row per candidate: its id, the truth and the attack's score(s), full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        writer.writerow(["record", "truth", "score"])
        rows = ([repr(float(s))] for s in scores)
    else:
        writer.writerow(["record", "truth", *(f"score_{k}" for k in range(scores.shape[1]))])
        rows = ([repr(float(v)) for v in row] for row in scores)
    for record, truth, row in zip(challenge.record_ids, challenge.truth, rows, strict=True):
        writer.writerow([record, int(truth), *row])
    return buffer.getvalue().encode("utf-8")


def save_scores(path: Path, scores: np.ndarray, challenge: Challenge) -> None:
    """Write :func:`scores_csv` to `path` atomically."""
    atomic_write_bytes(path, scores_csv(scores, challenge))
