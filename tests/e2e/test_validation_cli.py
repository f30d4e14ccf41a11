"""The built-in quickstart from the CLI: the report carries the attacker-side validation."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from gradaudit.cli import app


def test_quickstart_report_has_validation_table(tmp_path: Path) -> None:
    out = tmp_path / "quickstart"
    result = CliRunner().invoke(
        app,
        ["audit", "--out", str(out), "--set", "attacks[1].params.iterations=150"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    labels, inversion = report["attacks"]
    assert "per_example" not in labels and labels["psnr_curve"] == []
    assert inversion["status"] == "ok", inversion["reason"]
    rows = inversion["per_example"]
    batch = report["scenario"]["federation"]["local"]["batch_size"]
    assert len(rows) == batch and sorted(r["image"] for r in rows) == list(range(batch))
    for row in rows:
        assert {"psnr", "ssim", "confidence", "kept", "recognisable", "label"} <= row.keys()
        assert -1.0 <= row["confidence"] <= 1.0
        assert row["kept"] == (row["confidence"] >= report["scenario"]["threat"]["keep_threshold"])
    validation = inversion["validation"]
    assert validation["method"] == "leave_one_out"  # the quickstart MLP has no BatchNorm
    assert validation["kept"] == sum(r["kept"] for r in rows)
    assert {"kept", "confidence_spearman", "confidence_kendall"} <= inversion["metrics"].keys()
    assert "psnr_curve" in inversion
    html = (out / "report.html").read_text()
    assert 'class="per-example"' in html
    assert f"The attacker would keep {validation['kept']} of {batch}" in html or (
        validation["kept"] == 0 and "keep none of its" in html
    )
    assert validation["recognisable_definition"] in html
