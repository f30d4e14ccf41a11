"""Membership inference end to end: the challenge, the scores file, intervals, the ROC, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gradaudit.cli import app

MIA = """
name: mia-tiny
seed: 1
data: {dataset: digits, num_clients: 3, max_train_examples: 240, partition: {kind: iid}}
model: {kind: mlp, params: {hidden: [64]}}
federation: {algorithm: fedavg, rounds: 3, local: {batch_size: 16, lr: 0.2, epochs: 3}}
threat:
  knows: [architecture, local_hyperparameters]
  target: {round: 2, client: 1}
  candidates: {members: 60, non_members: 70}
attacks:
  - {kind: membership_loss}
  - {kind: membership_temporal}
  - {kind: label_recovery}
"""

runner = CliRunner()


def read_csv(path: Path) -> list[list[str]]:
    return list(csv.reader(path.read_text(encoding="utf-8").splitlines()))


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mia")
    (root / "mia.yaml").write_text(MIA, encoding="utf-8")
    result = runner.invoke(app, ["audit", str(root / "mia.yaml"), "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return root


def test_membership_attacks_are_scored_on_one_shared_challenge(audited: Path) -> None:
    report = json.loads((audited / "out" / "report.json").read_text())
    loss, temporal, labels = report["attacks"]
    assert "question" not in labels  # a reconstruction attack answers no question
    for entry in (loss, temporal):
        assert entry["status"] == "ok", entry["reason"]
        assert entry["question"] == "membership"
        assert entry["candidates"] == {"members": 60, "non_members": 70}
        metrics = entry["metrics"]
        assert set(metrics) == {
            "auc",
            "tpr_at_fpr_0.01",
            "tpr_at_fpr_0.001",
            "advantage",
            "balanced_accuracy",
        }
        for key, (lo, hi) in entry["intervals"].items():
            assert lo <= metrics[key] <= hi
        assert any("70 non-members" in n for n in entry["notes"])
    table = read_csv(audited / "out" / loss["artifacts"][0])
    assert table[0] == ["record", "truth", "score"]
    ids = [r[0] for r in table[1:]]
    assert len(ids) == 130 and len(set(ids)) == 130
    assert sum(r[1] == "1" for r in table[1:]) == 60
    other = read_csv(audited / "out" / temporal["artifacts"][0])
    assert [r[:2] for r in other] == [r[:2] for r in table]  # the same candidates, same order
    members = {r[0] for r in table[1:] if r[1] == "1"}
    assert all(m.startswith("train:") for m in members)
    assert all(r[0].startswith("test:") for r in table[1:] if r[1] == "0")


def test_scores_reproduce_the_reported_auc(audited: Path) -> None:
    from gradaudit.metrics.inference import auc

    report = json.loads((audited / "out" / "report.json").read_text())
    entry = report["attacks"][0]
    table = read_csv(audited / "out" / entry["artifacts"][0])[1:]
    scores = np.array([float(r[2]) for r in table])
    truth = np.array([r[1] == "1" for r in table])
    assert auc(scores, truth) == entry["metrics"]["auc"]


def test_the_html_shows_the_log_log_roc_and_the_intervals(audited: Path) -> None:
    report = json.loads((audited / "out" / "report.json").read_text())
    assert "roc.png" in report["artifacts"]
    html = (audited / "out" / "report.html").read_text()
    assert "ROC on log–log axes" in html and "TPR at 1% FPR" in html
    assert "scores/attack0.csv" in html
    assert any("membership" in f for f in report["risk"]["findings"])


def test_a_rerun_reuses_finished_attacks_and_their_scores(audited: Path) -> None:
    before = json.loads((audited / "out" / "report.json").read_text())["attacks"]
    result = runner.invoke(app, ["audit", str(audited / "mia.yaml"), "--out", str(audited / "out")])
    assert result.exit_code == 0, result.output
    after = json.loads((audited / "out" / "report.json").read_text())["attacks"]
    assert [a["metrics"] for a in after] == [b["metrics"] for b in before]
    assert (audited / "out" / after[0]["artifacts"][0]).is_file()


def test_candidates_are_a_validated_threat_field(tmp_path: Path) -> None:
    bad = MIA.replace("non_members: 70", "nonmembers: 70")
    (tmp_path / "bad.yaml").write_text(bad, encoding="utf-8")
    result = runner.invoke(app, ["audit", str(tmp_path / "bad.yaml"), "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "threat.candidates.nonmembers" in result.output
