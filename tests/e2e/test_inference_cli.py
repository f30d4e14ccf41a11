"""Source and property inference, the malicious server's active attack and the DP audit, from
the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradaudit.cli import app

SCENARIO = """
name: inference-tiny
seed: 2
data: {dataset: digits, num_clients: 3, max_train_examples: 240, partition: {kind: iid}}
model: {kind: mlp, params: {hidden: [64]}}
federation: {algorithm: fedavg, rounds: 3, local: {batch_size: 16, lr: 0.2, epochs: 3}}
threat:
  behaviour: malicious
  knows: [architecture, local_hyperparameters, public_data]
  target: {round: 2, client: 0}
attacks:
  - {kind: membership_active}
  - {kind: source_inference}
  - {kind: property_inference, params: {property: label, label: 3, min_share: 0.1, aux_updates: 8}}
dp_audit: {canaries: 60}
"""

runner = CliRunner()


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root = tmp_path_factory.mktemp("inference")
    (root / "s.yaml").write_text(SCENARIO, encoding="utf-8")
    result = runner.invoke(app, ["audit", str(root / "s.yaml"), "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    assert "DP audit (client level, 60 canaries)" in result.output
    return json.loads((root / "out" / "report.json").read_text()), root / "out"


def test_each_question_is_scored_its_own_way(report) -> None:
    data, _ = report
    active, source, prop = data["attacks"]
    for entry in (active, source, prop):
        assert entry["status"] == "ok", entry["reason"]
    assert active["question"] == "membership"
    assert active["details"]["sent_model"] == "edited (gradient ascent on the candidates)"
    assert source["question"] == "source"
    assert set(source["metrics"]) == {"accuracy", "baseline_accuracy", "gain"}
    assert source["candidates"]["answers"] == 3
    assert prop["question"] == "property"
    assert "auc" in prop["metrics"]


def test_the_dp_audit_sits_beside_the_privacy_block(report) -> None:
    data, out = report
    audit = data["privacy_audit"]
    assert audit["status"] == "ok"
    assert audit["canaries"] == 60 and audit["level"] == "client"
    assert audit["epsilon_lower_bound"] >= 0 and audit["accountant_epsilon"] is None
    assert 0 < audit["guesses"] <= 60 and 0 <= audit["correct"] <= audit["guesses"]
    html = (out / "report.html").read_text()
    assert "Empirical check of ε" in html


def test_an_honest_server_cannot_run_the_active_attack(tmp_path: Path) -> None:
    honest = SCENARIO.replace("behaviour: malicious", "behaviour: honest_but_curious")
    honest = honest.replace("dp_audit: {canaries: 60}", "")
    (tmp_path / "s.yaml").write_text(honest, encoding="utf-8")
    result = runner.invoke(app, ["audit", str(tmp_path / "s.yaml"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    active = json.loads((tmp_path / "report.json").read_text())["attacks"][0]
    assert active["status"] == "not_applicable"
    assert "honest-but-curious" in active["reason"]
