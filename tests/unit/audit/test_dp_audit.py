"""One-run privacy auditing: the bounds (oracles) and the canary runs (sanity)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from gradaudit.audit import dp_audit
from gradaudit.audit.dp_audit import (
    audit_scores,
    clopper_pearson_upper,
    epsilon_from_rates,
    guess_choices,
    guesses_from_scores,
    one_run_epsilon_lower_bound,
    one_run_p_value,
    run_dp_audit,
)
from gradaudit.config import build_scenario
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator

# --------------------------------------------------------------------------- the bounds


@pytest.mark.parametrize(
    ("confidence", "expected"),
    [(0.95, 3.4791953936219215), (0.99, 3.023197554051876)],
)
def test_one_run_bound_matches_published_values(confidence, expected) -> None:
    # Steinke, Nasr & Jagielski 2023, Appendix D (get_eps_audit with the delta term of
    # Corollary 5.4): m = 500 canaries, r = 100 guesses all correct, delta = 1e-5. The values are
    # those a published audit computed with the paper's code (huggingface.co/
    # melihcatal/codedp-cpt-models, starcoder2-7b/base/audit_results.json: "num_canaries": 500,
    # "num_guesses": 100, "correct_guesses": 100, empirical_epsilon 0.05 -> 3.4791953936219215,
    # 0.01 -> 3.023197554051876).
    got = one_run_epsilon_lower_bound(500, 100, 100, delta=1e-5, confidence=confidence)
    assert got == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("guesses", [1, 10, 100, 1000])
def test_one_run_bound_without_delta_is_randomised_response(guesses) -> None:
    # With delta = 0 and all r guesses right the p-value is q^r (Theorem: f(r) = P[Bin(r, q) >=
    # r]), so the bound solves q^r = 1 - confidence: epsilon = logit(0.05^(1/r)), and 0 when
    # that is negative (one right guess refutes nothing at 95%).
    q = 0.05 ** (1 / guesses)
    expected = max(0.0, math.log(q / (1 - q)))
    got = one_run_epsilon_lower_bound(10_000, guesses, guesses, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def _p_value_by_hand(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The Corollary's formula written out term by term, with Binomial pmfs."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [scipy.stats.binom.pmf(k, r, q) for k in range(r + 1)]
    f = [sum(pmf[k:]) for k in range(r + 1)]  # f(v) = P[Bin >= v]
    alpha = max((f[v - i] - f[v]) / i for i in range(1, v + 1))
    return min(f[v] + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [(100, 40, 30, 0.5, 1e-3), (1000, 200, 150, 1.0, 1e-5), (50, 50, 45, 2.0, 0.01)],
)
def test_p_value_follows_the_theorem(m, r, v, eps, delta) -> None:
    got = one_run_p_value(m, r, v, epsilon=eps, delta=delta)
    assert got == pytest.approx(_p_value_by_hand(m, r, v, eps, delta), rel=1e-9)


def test_bound_is_the_largest_rejected_epsilon() -> None:
    bound = one_run_epsilon_lower_bound(1000, 200, 170, delta=1e-5, confidence=0.95)
    assert one_run_p_value(1000, 200, 170, epsilon=bound, delta=1e-5) < 0.05
    assert one_run_p_value(1000, 200, 170, epsilon=bound + 1e-6, delta=1e-5) >= 0.05 - 1e-9
    # more correct guesses, or a smaller delta, refute more
    assert one_run_epsilon_lower_bound(1000, 200, 190, delta=1e-5, confidence=0.95) > bound
    assert one_run_epsilon_lower_bound(1000, 200, 170, delta=1e-3, confidence=0.95) < bound
    # chance-level guessing refutes nothing
    assert one_run_epsilon_lower_bound(1000, 200, 100, delta=1e-5, confidence=0.95) == 0.0


def test_bound_is_valid_for_randomised_response() -> None:
    # Canaries guessed by eps-DP randomised response (each guess right with probability
    # e^eps / (1 + e^eps)) are an eps-DP mechanism: the 95% lower bound may exceed eps in at
    # most 5% of runs (randomised response is the worst case, so close to 5%).
    rng = np.random.default_rng(0)
    eps, runs = 1.0, 400
    above = 0
    for _ in range(runs):
        correct = int(rng.binomial(1000, math.exp(eps) / (1 + math.exp(eps))))
        bound = one_run_epsilon_lower_bound(1000, 1000, correct, delta=0.0, confidence=0.95)
        above += bound > eps
    assert above / runs <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)


def test_epsilon_from_rates_against_clopper_pearson_by_hand() -> None:
    # The epsilon lower bound against a Clopper-Pearson computation on a fixed ROC point:
    # scores of 100 members and 100 non-members, threshold 0.5.
    rng = np.random.default_rng(3)
    members = rng.normal(1.5, 1.0, 100)
    others = rng.normal(0.0, 1.0, 100)
    fp = int(np.sum(others >= 0.5))
    fn = int(np.sum(members < 0.5))
    delta, confidence = 1e-5, 0.95
    # by hand: each one-sided bound at 1 - 0.05/2 (a union bound over the two rates)
    fpr_up = scipy.stats.beta.ppf(1 - 0.025, fp + 1, 100 - fp)
    fnr_up = scipy.stats.beta.ppf(1 - 0.025, fn + 1, 100 - fn)
    expected = max(
        0.0,
        math.log((1 - delta - fnr_up) / fpr_up),
        math.log((1 - delta - fpr_up) / fnr_up) if 1 - delta - fpr_up > 0 else 0.0,
    )
    got = epsilon_from_rates(fp, 100, fn, 100, delta=delta, confidence=confidence)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got > 0.5  # the attack is good enough to refute something


def test_epsilon_from_rates_edges() -> None:
    # a perfect attack on 100 + 100 trials: FNR = FPR = 0, the upper bounds are 1 - 0.025^(1/100)
    upper = 1 - 0.025 ** (1 / 100)
    assert clopper_pearson_upper(0, 100, confidence=0.975) == pytest.approx(upper)
    got = epsilon_from_rates(0, 100, 0, 100, delta=0.0, confidence=0.95)
    assert got == pytest.approx(math.log((1 - upper) / upper))
    # a useless attack refutes nothing
    assert epsilon_from_rates(50, 100, 50, 100, delta=0.0, confidence=0.95) == 0.0
    with pytest.raises(ValueError, match="confidence"):
        epsilon_from_rates(0, 10, 0, 10, delta=0.0, confidence=1.0)


def test_guesses_and_the_split_confidence() -> None:
    # Prepare: 200 canaries, the inserted ones score higher
    rng = np.random.default_rng(1)
    inserted = rng.random(200) < 0.5
    scores = np.where(inserted, 1.0, 0.0) + rng.normal(0, 0.01, 200)
    # Execute
    audit = audit_scores(scores, inserted, delta=1e-5, confidence=0.95)
    # Assert: the best guess set is all correct, and its bound holds at 1 - 0.05 / 6
    choices = guess_choices(200)
    assert audit.choices == len(choices) == 6
    assert audit.correct == audit.guesses == audit.k_plus <= int(inserted.sum())
    expected = one_run_epsilon_lower_bound(
        200, audit.guesses, audit.guesses, delta=1e-5, confidence=1 - 0.05 / 6
    )
    assert audit.epsilon_lower_bound == pytest.approx(expected)
    guesses = guesses_from_scores(scores, k_plus=3, k_minus=2)
    assert (guesses == 1).sum() == 3 and (guesses == -1).sum() == 2
    assert set(np.flatnonzero(guesses == 1)) <= set(np.flatnonzero(inserted))


# --------------------------------------------------------------------------- canary runs


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _scenario(defenses, *, canaries=500, level="auto", rounds=3, **federation):
    return build_scenario(
        {
            "seed": 0,
            "data": {"dataset": "digits", "num_clients": 4},
            "model": {"kind": "mlp", "params": {"hidden": [32]}},
            "federation": {
                "algorithm": "fedavg",
                "rounds": rounds,
                "local": {"batch_size": 32, "lr": 0.1, "epochs": 1},
                **federation,
            },
            "defenses": {"client": defenses},
            "dp_audit": {"canaries": canaries, "level": level},
        }
    )


def _audit(scenario, digits):
    clients = partition_dataset(
        "iid",
        {},
        digits.y_train.numpy(),
        scenario.data.num_clients,
        rng=numpy_rng(0, "partition"),
        groups=None,
    )

    def fresh():
        return build_model("mlp", {"hidden": [32]}, digits.info, generator=torch_generator(0, "m"))

    return run_dp_audit(scenario, digits, clients, build_model=fresh), clients


def _dp(level="client", noise=1.0, **params):
    return [
        {
            "kind": "dp_gaussian",
            "params": {"level": level, "noise_multiplier": noise, "clip_norm": 1.0, **params},
        }
    ]


def test_no_defense_leaks_a_large_bound(digits) -> None:
    report, _ = _audit(_scenario([]), digits)
    assert report["level"] == "client"
    assert report["epsilon_lower_bound"] > 2.5  # 100 of 100 guesses right: about 2.98
    assert report["accountant_epsilon"] is None
    assert any("no defense has a privacy accountant" in n for n in report["notes"])
    assert report["method"] == "one-run (Steinke et al. 2023)"
    assert 200 < report["inserted"] < 300 and report["canaries"] == 500


def test_clipping_without_noise_leaks_a_large_bound(digits) -> None:
    report, _ = _audit(_scenario(_dp(noise=1e-6)), digits)
    assert report["epsilon_lower_bound"] > 2.5
    assert report["correct"] == report["guesses"]


def test_big_noise_bounds_nothing(digits) -> None:
    report, _ = _audit(_scenario(_dp(noise=50.0)), digits)
    assert report["epsilon_lower_bound"] < 0.1
    assert report["accountant_epsilon"] is not None


def test_moderate_noise_stays_below_the_accountant(digits) -> None:
    # Prepare: DP-FedAvg, z = 1, 3 rounds with every client: accountant epsilon about 9
    report, _ = _audit(_scenario(_dp(noise=1.0)), digits)
    # Assert: the canaries are found (a positive bound) but never beyond the guarantee
    assert 0.5 < report["epsilon_lower_bound"] <= report["accountant_epsilon"]
    assert report["delta"] == 1e-5 and report["accountant_level"] == "client"


def test_fixed_cohorts_keep_their_sampling_rate(digits) -> None:
    # 2 of 4 clients per round; with ~250 canary clients the cohort grows to ~127 of ~254
    report, _ = _audit(
        _scenario(_dp(noise=1.0, neighbours="replace_one"), clients_per_round=2), digits
    )
    assert any("the cohort grew to" in n for n in report["notes"])
    assert report["epsilon_lower_bound"] <= report["accountant_epsilon"]


def test_sample_level_audit_runs_beside_the_real_data(digits) -> None:
    # Prepare
    scenario = _scenario(_dp(level="sample", noise=1.0), canaries=100, rounds=2)
    x_before, y_before = digits.x_train.clone(), digits.y_train.clone()
    # Execute
    report, clients = _audit(scenario, digits)
    # Assert: example-level, below the accountant; the dataset and the partition are untouched
    assert report["level"] == "sample"
    assert report["epsilon_lower_bound"] <= report["accountant_epsilon"]
    assert "minus the canary record's cross-entropy" in report["statistic"]
    assert torch.equal(digits.x_train, x_before) and torch.equal(digits.y_train, y_before)
    assert max(int(c.max()) for c in clients) < len(digits.y_train)


def test_client_audit_of_sample_level_dp_has_no_comparable_epsilon(digits) -> None:
    report, _ = _audit(_scenario(_dp(level="sample"), canaries=50, level="client"), digits)
    assert report["accountant_epsilon"] is None
    assert any("example-level" in n for n in report["notes"])


def test_refuses_canaries_that_do_not_fit(digits, monkeypatch) -> None:
    monkeypatch.setattr(dp_audit, "MAX_CANARY_FLOATS", 1000)
    with pytest.raises(ValueError, match="use fewer canaries"):
        _audit(_scenario([]), digits)
