"""The privacy ledger against the issue's reference values and dp-accounting's semantics."""

from __future__ import annotations

import math

import pytest

from gradaudit.defenses.accounting import (
    GaussianRound,
    PrivacyLedger,
    epsilon,
    full_participation_warning,
)


def test_abadi_setting_rdp_and_pld_oracles() -> None:
    # q = 0.01, sigma = 1.1, 10 000 steps, delta = 1e-5 (issue 4's reference values).
    steps = [GaussianRound(1.1, sample_rate=0.01, count=10_000)]
    assert epsilon(steps, 1e-5) == pytest.approx(5.63201, abs=5e-5)
    assert epsilon(steps, 1e-5, accountant="pld") == pytest.approx(5.1926, abs=5e-4)


def test_client_level_oracle() -> None:
    # q = 100/3400 clients per round, sigma = 1.0, 1 500 rounds, delta = 3400^-1.1.
    rounds = [GaussianRound(1.0, sample_rate=100 / 3400, count=1500)]
    assert epsilon(rounds, 3400**-1.1) == pytest.approx(7.07059, abs=5e-5)


def test_composition_splits_like_one_event() -> None:
    whole = epsilon([GaussianRound(1.0, sample_rate=0.05, count=200)], 1e-5)
    parts = epsilon(
        [GaussianRound(1.0, sample_rate=0.05, count=120)] * 1
        + [GaussianRound(1.0, sample_rate=0.05, count=80)],
        1e-5,
    )
    assert parts == pytest.approx(whole, rel=1e-9)


def test_sampling_amplifies_and_more_noise_helps() -> None:
    full = epsilon([GaussianRound(1.0, sampling="all", count=50)], 1e-5)
    poisson = epsilon([GaussianRound(1.0, sample_rate=0.1, count=50)], 1e-5)
    fixed = epsilon(
        [GaussianRound(1.0, sampling="fixed", sample_size=10, population=100, count=50)],
        1e-5,
        neighbours="replace_one",
    )
    noisier = epsilon([GaussianRound(2.0, sample_rate=0.1, count=50)], 1e-5)
    assert poisson < full and fixed < full and noisier < poisson
    assert math.isfinite(fixed)


def test_ledger_reports_worst_client_and_lists_differences() -> None:
    ledger = PrivacyLedger(level="client", delta=1e-5)
    for client, sigma in ((0, 1.0), (1, 2.0)):
        ledger.record(client, GaussianRound(sigma, sample_rate=0.2, count=30))
    report = ledger.report()
    assert report is not None
    assert report.epsilon == pytest.approx(report.per_client[0])
    assert report.per_client[1] < report.per_client[0]
    data = report.as_dict()
    assert data["delta"] == 1e-5 and data["level"] == "client" and data["accountant"] == "rdp"


def test_ledger_with_equal_clients_gives_one_number_and_max_epsilon_check() -> None:
    ledger = PrivacyLedger(level="sample", delta=1e-5)
    for client in range(3):
        ledger.record(client, GaussianRound(1.1, sample_rate=0.01, count=1000))
    report = ledger.report()
    assert report is not None and report.per_client == {}
    step = GaussianRound(1.1, sample_rate=0.01, count=9000)
    assert ledger.would_exceed(5.0, {0: step})
    assert not ledger.would_exceed(6.0, {0: step})
    assert PrivacyLedger(level="client", delta=1e-5).report() is None


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianRound(0.0)
    with pytest.raises(ValueError, match="sample_rate"):
        GaussianRound(1.0, sample_rate=1.5)
    with pytest.raises(ValueError, match="sample_size"):
        GaussianRound(1.0, sampling="fixed", sample_size=5, population=3)
    with pytest.raises(ValueError, match="delta"):
        epsilon([GaussianRound(1.0)], 0.0)
    with pytest.raises(ValueError, match="accountant"):
        epsilon([GaussianRound(1.0)], 1e-5, accountant="moments")  # type: ignore[arg-type]


def test_full_participation_warning() -> None:
    assert full_participation_warning(10, 1.0, 100, 1e-3) is not None
    assert full_participation_warning(10, 50.0, 1, 1e-3) is None
