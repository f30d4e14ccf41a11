"""Table rows, diagnosis codes, clinical text and notes-with-fields recovered from one update,
from the CLI: each modality scored on its own columns, shown side by side in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradaudit.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

OFFLINE = """
name: rows-offline
seed: 0
data: {dataset: breast_cancer, num_clients: 4}
model: {kind: tabular_mlp, params: {hidden: [32]}}
federation: {algorithm: fedsgd, rounds: 1, local: {batch_size: 2, lr: 0.1}}
threat: {knows: [architecture, labels, batch_size], target: {round: 1, client: 0}}
attacks:
  - {kind: tabular_inversion, params: {iterations: 300, restarts: 4}}
"""


def audit(tmp_path: Path, scenario: Path, *args: str) -> dict:
    out = tmp_path / "out"
    result = runner.invoke(app, ["audit", str(scenario), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file()
    return json.loads((out / "report.json").read_text())


def test_rows_of_an_embedded_table_are_scored_against_random_rows(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(OFFLINE, encoding="utf-8")
    (entry,) = audit(tmp_path, tmp_path / "s.yaml")["attacks"]
    assert entry["status"] == "ok", entry["reason"]
    m = entry["metrics"]
    assert 0.0 <= m["feature_accuracy_random"] < m["feature_accuracy"] <= 1.0
    rows = entry["recovered"]["rows"]
    assert len(rows) == 2 and set(rows[0]["truth"]) == set(rows[0]["reconstructed"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Reconstructed records" in html


@pytest.mark.data
def test_heart_disease_codes_and_rows(tmp_path: Path, shared_data_dir: Path) -> None:
    data = audit(
        tmp_path,
        REPO / "scenarios" / "heart-disease-tabular.yaml",
        "--data-dir",
        str(shared_data_dir),
        "--set",
        "attacks[2].params.iterations=300",
        "--set",
        "attacks[2].params.restarts=8",
    )
    labels, codes, rows = data["attacks"]
    assert labels["metrics"]["labels_exact"] == 1.0
    assert codes["metrics"]["code_recall"] == 1.0 and codes["metrics"]["code_precision"] == 1.0
    assert any(name.startswith("cp=") for name in codes["recovered"]["bag"]["recovered"])
    m = rows["metrics"]
    assert m["feature_accuracy"] > m["feature_accuracy_random"] + 0.2
    assert m["kept_rows"] <= 8
    assert data["risk"]["level"] == "high"


def medquad(tmp_path: Path, data_dir: Path, *overrides: str) -> dict:
    """The report of scenarios/medquad-text.yaml, one round, with `--set` overrides."""
    sets = [arg for value in ("federation.rounds=1", *overrides) for arg in ("--set", value)]
    scenario = REPO / "scenarios" / "medquad-text.yaml"
    return audit(tmp_path, scenario, "--data-dir", str(data_dir), *sets)


@pytest.mark.data
def test_medquad_bag_of_words(tmp_path: Path, shared_data_dir: Path) -> None:
    data = medquad(tmp_path, shared_data_dir)
    tokens = next(e for e in data["attacks"] if e["attack"] == "text_tokens")
    assert tokens["metrics"]["token_recall"] == 1.0
    assert tokens["metrics"]["token_precision"] == 1.0
    (sentence,) = tokens["recovered"]["texts"]
    assert sentence["reconstructed"] == sentence["truth"]  # batch 1: order from positions
    inverted = next(e for e in data["attacks"] if e["attack"] == "text_inversion")
    assert inverted["metrics"]["rouge1"] == inverted["metrics"]["rouge2"] == 1.0
    assert inverted["recovered"]["texts"] == tokens["recovered"]["texts"]


@pytest.mark.data
def test_medquad_four_sentences(tmp_path: Path, shared_data_dir: Path) -> None:
    """4 x 16 tokens: labels counted from the head (on dummy sentences of valid token ids) and
    the four sentences reconstructed in order (measured 1.00 ROUGE-1/2 on this update)."""
    data = medquad(tmp_path, shared_data_dir, "federation.local.batch_size=4")
    entries = {e["attack"]: e for e in data["attacks"]}
    assert entries["label_recovery"]["metrics"]["labels_exact"] == 1.0
    inverted = entries["text_inversion"]
    assert inverted["status"] == "ok", inverted["reason"]
    assert len(inverted["recovered"]["texts"]) == 4
    assert inverted["metrics"]["rouge1"] >= 0.8
    assert data["risk"]["level"] == "high"
