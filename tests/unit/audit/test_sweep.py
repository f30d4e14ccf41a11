"""The defense sweep: loading and validating variants, running, resuming, the summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from gradaudit.audit.sweep import load_sweep, markdown_table, run_sweep
from gradaudit.cli import app
from gradaudit.errors import ConfigError

SWEEP = {
    "name": "tiny-sweep",
    "data": {"dataset": "digits", "num_clients": 3},
    "model": {"kind": "mlp", "params": {"hidden": [16]}},
    "federation": {"rounds": 2, "local": {"batch_size": 1}},
    "attacks": [{"kind": "label_recovery"}],
    "sweep": [
        {"label": "no defense"},
        {
            "label": "top-k 10%",
            "defenses": {"client": [{"kind": "topk", "params": {"fraction": 0.1}}]},
        },
        {
            "label": "DP-FedAvg",
            "defenses": {"client": [{"kind": "dp_gaussian", "params": {"noise_multiplier": 1}}]},
            "set": ["federation.rounds=3"],
        },
    ],
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_variants_replace_the_defenses_and_apply_their_overrides(tmp_path: Path) -> None:
    name, variants = load_sweep(_write(tmp_path, SWEEP))
    assert name == "tiny-sweep"
    assert [v.slug for v in variants] == ["00-no-defense", "01-top-k-10", "02-dp-fedavg"]
    assert variants[0].scenario.defenses.client == ()
    assert variants[1].scenario.defenses.client[0].kind == "topk"
    assert variants[2].scenario.federation.rounds == 3
    assert variants[1].scenario.federation.rounds == 2


def test_a_bad_variant_fails_before_anything_runs_and_names_it(tmp_path: Path) -> None:
    bad = {
        **SWEEP,
        "sweep": [
            *SWEEP["sweep"],
            {
                "label": "typo",
                "defenses": {"client": [{"kind": "topk", "params": {"fractoin": 0.1}}]},
            },
        ],
    }
    with pytest.raises(ConfigError, match=r"(?s)sweep\[3\]: typo.*fractoin"):
        load_sweep(_write(tmp_path, bad))


def test_a_scenario_without_sweep_is_refused_with_a_hint(tmp_path: Path) -> None:
    plain = {k: v for k, v in SWEEP.items() if k != "sweep"}
    with pytest.raises(ConfigError, match="gradaudit audit"):
        load_sweep(_write(tmp_path, plain))


def test_sweep_runs_summarises_and_reuses_finished_variants(tmp_path: Path) -> None:
    # Prepare
    name, variants = load_sweep(_write(tmp_path, SWEEP))
    out = tmp_path / "out"
    # Execute
    summary = run_sweep(name, variants, out)
    # Check: one row per variant, with utility, bytes, guarantee and the attack's metrics
    rows = summary["rows"]
    assert [r["label"] for r in rows] == ["no defense", "top-k 10%", "DP-FedAvg"]
    assert rows[1]["bytes_up_per_client"] < rows[0]["bytes_up_per_client"] / 3
    assert rows[1]["guarantee"] == "none (heuristic)" and rows[1]["epsilon"] is None
    assert rows[2]["epsilon"] > 0 and rows[2]["privacy_level"] == "client"
    assert rows[0]["attacks"]["label_recovery"]["label_accuracy"] == 1.0
    assert json.loads((out / "sweep.json").read_text())["rows"] == rows
    assert "top-k 10%" in (out / "sweep.html").read_text(encoding="utf-8")
    assert "| top-k 10% | none (heuristic) |" in markdown_table(summary)

    # a second run audits nothing again
    def refuse(scenario, folder):
        raise AssertionError(f"re-ran {scenario.name}")

    again = run_sweep(name, variants, out, run=refuse)
    assert again["rows"] == rows


def test_sweep_command_end_to_end(tmp_path: Path) -> None:
    small = {**SWEEP, "sweep": SWEEP["sweep"][:2]}
    result = CliRunner().invoke(
        app, ["sweep", str(_write(tmp_path, small)), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "| no defense |" in result.output
    assert (tmp_path / "o" / "sweep.png").is_file()
