"""Oracle tests of the inference metrics: sklearn's ROC/AUC, scipy's exact binomial interval,
Hanley–McNeil by hand, and the AUC of a perfect and of a random scorer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from gradaudit.metrics.inference import (
    auc,
    auc_interval,
    binary_metrics,
    choice_metrics,
    clopper_pearson,
    resolution_warnings,
    roc,
    tpr_at_fpr,
)


def test_a_perfect_scorer_has_auc_one_and_full_tpr_at_any_fpr():
    truth = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    scores = np.r_[np.linspace(2, 3, 500), np.linspace(0, 1, 500)]
    metrics, intervals, _ = binary_metrics(scores, truth)
    assert metrics["auc"] == 1.0
    assert metrics["tpr_at_fpr_0.01"] == 1.0 and metrics["tpr_at_fpr_0.001"] == 1.0
    assert metrics["advantage"] == 1.0 and metrics["balanced_accuracy"] == 1.0
    assert intervals["auc"][1] == 1.0


def test_a_random_scorer_has_auc_one_half_within_its_interval():
    rng = np.random.default_rng(0)
    truth = rng.random(4000) < 0.5
    scores = rng.random(4000)
    metrics, intervals, _ = binary_metrics(scores, truth)
    lo, hi = intervals["auc"]
    assert lo < 0.5 < hi
    assert abs(metrics["auc"] - 0.5) < 0.03
    assert metrics["tpr_at_fpr_0.01"] < 0.05


def test_auc_and_roc_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    truth = rng.random(300) < 0.4
    scores = np.round(rng.normal(truth * 0.8, 1.0), 1)  # many ties
    assert auc(scores, truth) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    curve = roc(scores, truth)
    np.testing.assert_allclose(curve.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(curve.tpr, tpr, atol=1e-12)


def test_tpr_at_fpr_is_the_best_tpr_without_exceeding_the_fpr():
    truth = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0], bool)
    scores = np.arange(10, 0, -1, dtype=float)
    curve = roc(scores, truth)
    # thresholds: after 2 records tp=2, fp=0; after 3 fp=1 (FPR 1/6)
    assert tpr_at_fpr(curve, 0.01) == 0.5
    assert tpr_at_fpr(curve, 1 / 6) == 0.75
    fpr, tpr, _ = roc_curve(truth, scores)
    assert tpr_at_fpr(curve, 0.2) == tpr[fpr <= 0.2].max()


def test_clopper_pearson_matches_scipy_exact_interval():
    for k, n in [(0, 10), (3, 10), (10, 10), (17, 300)]:
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        lo, hi = clopper_pearson(k, n)
        assert lo == pytest.approx(ci.low, abs=1e-12)
        assert hi == pytest.approx(ci.high, abs=1e-12)


def test_auc_interval_is_hanley_mcneil_by_hand():
    a, m, n = 0.8, 50, 70
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n))
    lo, hi = auc_interval(a, m, n)
    assert lo == pytest.approx(a - 1.959963984540054 * se)
    assert hi == pytest.approx(a + 1.959963984540054 * se)


def test_too_few_non_members_are_named():
    assert resolution_warnings(1000) == []
    (only,) = resolution_warnings(150)
    assert "150 non-members" in only and "0.001" in only
    assert len(resolution_warnings(50)) == 2


def test_binary_metrics_refuse_a_one_sided_truth_and_non_finite_scores():
    with pytest.raises(ValueError, match="positive and one negative"):
        binary_metrics([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="not finite"):
        binary_metrics([np.nan, 0.2], [True, False])


def test_choice_metrics_report_the_gain_over_the_baseline():
    truth = np.array([0, 1, 2, 2])
    scores = np.eye(3)[[0, 1, 2, 0]]
    metrics, intervals, notes = choice_metrics(scores, truth, np.array([2, 2, 2, 2]))
    assert metrics == {"accuracy": 0.75, "baseline_accuracy": 0.5, "gain": 0.25}
    assert intervals["accuracy"][0] < 0.75 < intervals["accuracy"][1]
    assert "never saw the model" in notes[0]
    with pytest.raises(ValueError, match="choice scores"):
        choice_metrics(np.zeros(4), truth, None)
