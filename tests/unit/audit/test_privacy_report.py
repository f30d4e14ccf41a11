"""The report's privacy and defenses blocks, and a privacy budget that stops training."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradaudit.audit.runner import run_audit
from gradaudit.cli import defense_lines
from gradaudit.config import build_scenario
from gradaudit.defenses.accounting import GaussianRound, epsilon

BASE = {
    "name": "unit",
    "data": {"dataset": "digits", "num_clients": 4},
    "model": {"kind": "mlp", "params": {"hidden": [16]}},
    "federation": {"rounds": 3, "local": {"batch_size": 2}},
    "attacks": [{"kind": "label_recovery"}],
}


def test_no_dp_defense_means_a_null_privacy_block(tmp_path: Path) -> None:
    report = run_audit(build_scenario(BASE), tmp_path)
    assert report["privacy"] is None
    assert report["defenses"] == []
    assert report["federation"]["stopped"] is None


def test_dp_report_gives_epsilon_with_its_context_and_warnings(tmp_path: Path) -> None:
    # Prepare: DP-FedAvg with every client in every round
    raw = {
        **BASE,
        "defenses": {"client": [{"kind": "dp_gaussian", "params": {"noise_multiplier": 0.7}}]},
    }
    # Execute
    report = run_audit(build_scenario(raw), tmp_path)
    # Check: epsilon of 3 unsampled rounds at the default delta, with level and accountant
    privacy = report["privacy"]
    assert privacy["epsilon"] == pytest.approx(epsilon([GaussianRound(0.7, "all", count=3)], 1e-5))
    assert (privacy["delta"], privacy["level"], privacy["accountant"]) == (1e-5, "client", "rdp")
    assert (
        "does not protect an update from an honest-but-curious server"
        in (privacy["protects_against"])
    )
    assert any("above 10" in w for w in privacy["warnings"])
    assert report["defenses"][0]["guarantee"].startswith("(client-level) differential privacy")
    lines = defense_lines(report)
    assert any(line.startswith("privacy: epsilon") for line in lines)
    assert "ε" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_max_epsilon_stops_training_and_later_attacks_are_not_applicable(tmp_path: Path) -> None:
    # Prepare: the budget allows one round, the adversary targets round 3
    raw = {
        **BASE,
        "defenses": {
            "client": [
                {"kind": "dp_gaussian", "params": {"noise_multiplier": 2.0, "max_epsilon": 2.5}}
            ]
        },
        "threat": {"target": {"round": 3, "client": 0}},
    }
    assert epsilon([GaussianRound(2.0, "all", count=1)], 1e-5) <= 2.5
    assert epsilon([GaussianRound(2.0, "all", count=2)], 1e-5) > 2.5
    # Execute
    report = run_audit(build_scenario(raw), tmp_path)
    # Check
    assert len(report["federation"]["rounds"]) == 1
    assert "training stopped after round 1" in report["privacy"]["stopped_early"]
    entry = report["attacks"][0]
    assert entry["status"] == "not_applicable"
    assert "training stopped before round 3" in entry["reason"]
