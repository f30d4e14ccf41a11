"""The `gradaudit` command end to end on tiny scenarios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradaudit.cli import app

TINY = """
name: tiny
seed: 3
data: {dataset: digits, num_clients: 4, partition: {kind: iid}}
model: {kind: mlp, params: {hidden: [32]}}
federation: {algorithm: fedsgd, rounds: 2, local: {batch_size: 2, lr: 0.5}}
threat: {knows: [architecture], target: {round: 2, client: 1}}
attacks:
  - {kind: label_recovery}
  - {kind: inverting_gradients, params: {iterations: 60}}
"""

runner = CliRunner()


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY, encoding="utf-8")
    return path


def _audit(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["audit", *args])
    return result.exit_code, result.output


def test_audit_writes_json_and_self_contained_html(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, output = _audit(str(tiny), "--out", str(out))
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    for key in ("schema", "scenario", "versions", "utility", "privacy", "cost", "attacks", "risk"):
        assert key in report
    assert report["privacy"] is None
    assert len(report["utility"]["test_accuracy"]) == 2
    statuses = {a["attack"]: a["status"] for a in report["attacks"]}
    assert statuses == {"label_recovery": "ok", "inverting_gradients": "ok"}
    inversion = report["attacks"][1]
    assert {"psnr", "ssim", "label_accuracy"} <= inversion["metrics"].keys()
    assert (out / inversion["artifacts"][0]).is_file()
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 3  # images, convergence, utility
    assert "convergence.png" in report["artifacts"]
    assert "honest-but-curious server" in html


def test_same_seed_same_numbers(tiny: Path, tmp_path: Path) -> None:
    reports = []
    for name in ("a", "b"):
        code, output = _audit(str(tiny), "--out", str(tmp_path / name))
        assert code == 0, output
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
    assert reports[0]["utility"] == reports[1]["utility"]
    assert [a["metrics"] for a in reports[0]["attacks"]] == [
        a["metrics"] for a in reports[1]["attacks"]
    ]


def test_set_overrides_and_seed_changes_numbers(tiny: Path, tmp_path: Path) -> None:
    code, _ = _audit(
        str(tiny), "--out", str(tmp_path / "a"), "--set", "attacks[1].params.iterations=5"
    )
    assert code == 0
    code, _ = _audit(
        str(tiny),
        "--out",
        str(tmp_path / "b"),
        "--set",
        "seed=4",
        "--set",
        "attacks[1].params.iterations=5",
    )
    assert code == 0
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["attacks"][1]["details"]["iterations_run"] == 5
    assert a["utility"]["test_accuracy"] != b["utility"]["test_accuracy"]


def test_interrupted_run_resumes_finished_attacks(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _audit(str(tiny), "--out", str(out))[0] == 0
    first = json.loads((out / "report.json").read_text())
    (out / "report.json").unlink()  # as if the run died after its attacks
    assert _audit(str(tiny), "--out", str(out))[0] == 0
    again = json.loads((out / "report.json").read_text())
    assert again["attacks"] == first["attacks"]  # reused verbatim, seconds included


def test_config_error_exit_2_without_traceback(tiny: Path, tmp_path: Path) -> None:
    code, output = _audit(str(tiny), "--out", str(tmp_path / "o"), "--set", "federation.roundz=2")
    assert code == 2
    assert "federation.roundz: unknown key" in output
    assert "Traceback" not in output


def test_missing_scenario_file_exit_2(tmp_path: Path) -> None:
    code, output = _audit(str(tmp_path / "nope.yaml"))
    assert code == 2 and "scenario file not found" in output


def test_missing_dataset_file_names_where_it_looked(tiny: Path, tmp_path: Path) -> None:
    code, output = _audit(
        str(tiny),
        "--out",
        str(tmp_path / "o"),
        "--set",
        "data.dataset=mnist",
        "--data-dir",
        str(tmp_path / "empty"),
    )
    assert code == 2
    assert "mnist" in output and "empty" in output
    assert "Traceback" not in output


def test_failure_during_run_exit_1_traceback_only_with_debug(tiny, tmp_path, monkeypatch) -> None:
    import gradaudit.audit.runner as runner_module

    def boom(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(runner_module, "run_audit", boom)
    code, output = _audit(str(tiny), "--out", str(tmp_path / "o"))
    assert code == 1 and "disk on fire" in output and "Traceback" not in output
    code, output = _audit(str(tiny), "--out", str(tmp_path / "o"), "--debug")
    assert code == 1 and "Traceback" in output


def test_report_rerenders_and_rejects_corrupt_json(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _audit(str(tiny), "--out", str(out))[0] == 0
    (out / "report.html").unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0 and (out / "report.html").is_file()
    (out / "report.json").write_text("{ not json")
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 2 and "report.json" in result.output


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("datasets", "pneumoniamnist"),
        ("models", "convnet"),
        ("attacks", "inverting_gradients"),
        ("partitions", "dirichlet"),
        ("defenses", "client defense"),
    ],
)
def test_list(family: str, expected: str) -> None:
    result = runner.invoke(app, ["list", family])
    assert result.exit_code == 0 and expected in result.output


def test_builtin_quickstart_is_valid() -> None:
    from gradaudit.cli import _quickstart_path
    from gradaudit.config import load_scenario

    scenario = load_scenario(_quickstart_path())
    assert scenario.data.dataset == "digits" and scenario.data.num_clients == 8


@pytest.mark.data
@pytest.mark.parametrize(
    "name",
    sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "scenarios").glob("*.yaml")),
)
def test_ready_scenarios_validate(name: str, shared_data_dir: Path) -> None:
    from gradaudit.audit.sweep import load_sweep
    from gradaudit.config import load_scenario, read_yaml

    path = Path(__file__).resolve().parents[2] / "scenarios" / f"{name}.yaml"
    if "sweep" in read_yaml(path):  # a sweep file: every variant must validate
        _, variants = load_sweep(path, [f"data.data_dir={shared_data_dir}"])
        assert len(variants) > 1
    else:
        load_scenario(path, [f"data.data_dir={shared_data_dir}"])


def test_natural_partition_on_a_dataset_without_sites_exit_2(tiny: Path, tmp_path: Path) -> None:
    code, output = _audit(
        str(tiny), "--out", str(tmp_path / "o"), "--set", "data.partition.kind=natural"
    )
    assert code == 2
    assert "digits" in output and "natural" in output and "Traceback" not in output


def test_analytic_attack_from_the_cli_is_exact(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, output = _audit(
        str(tiny),
        "--out",
        str(out),
        "--set",
        "federation.local.batch_size=1",
        "--set",
        "attacks=[{kind: analytic}]",
    )
    assert code == 0, output
    entry = json.loads((out / "report.json").read_text())["attacks"][0]
    assert entry["status"] == "ok" and entry["metrics"]["psnr"] > 90.0
