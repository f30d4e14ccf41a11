"""The audit runner, scoring, risk levels and report rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradaudit.attacks.inversion.image import InvertingGradientsAttack
from gradaudit.audit.io import atomic_write_json
from gradaudit.audit.render import load_report
from gradaudit.audit.risk import assess
from gradaudit.audit.runner import run_audit
from gradaudit.audit.scoring import bag_names, score_inputs, score_reconstruction
from gradaudit.config import build_scenario
from gradaudit.errors import GradauditError
from gradaudit.types import Reconstruction, TabularSchema, TaskInfo, TextSchema

BASE = {
    "name": "unit",
    "data": {"dataset": "digits", "num_clients": 3},
    "model": {"kind": "mlp", "params": {"hidden": [16]}},
    "federation": {"rounds": 1, "local": {"batch_size": 2}},
}


def test_an_attack_that_raises_is_reported_as_failed(tmp_path: Path, monkeypatch) -> None:
    def broken(self, obs, model, *, rng, progress=None):
        raise RuntimeError("numerical blow-up")

    monkeypatch.setattr(InvertingGradientsAttack, "run", broken)
    scenario = build_scenario(
        {**BASE, "attacks": [{"kind": "inverting_gradients"}, {"kind": "label_recovery"}]}
    )
    report = run_audit(scenario, tmp_path)
    failed, labels = report["attacks"]
    assert failed["status"] == "failed" and "numerical blow-up" in failed["reason"]
    assert labels["status"] == "ok"  # one failure does not stop the others
    assert any("failed" in f for f in report["risk"]["findings"])


def test_target_that_did_not_take_part_is_not_applicable(tmp_path: Path) -> None:
    raw = {
        **BASE,
        "federation": {"rounds": 1, "clients_per_round": 1},
        "attacks": [{"kind": "label_recovery"}],
    }
    for client in range(3):  # exactly one of the three clients is sampled
        raw["threat"] = {"target": {"round": 1, "client": client}}
        report = run_audit(build_scenario(raw), tmp_path / str(client))
        sampled = report["federation"]["rounds"][0]["sampled"]
        entry = report["attacks"][0]
        if client in sampled:
            assert entry["status"] == "ok"
        else:
            assert entry["status"] == "not_applicable"
            assert entry["reason"] == f"client {client} sent no update in round 1"


def test_scoring_matches_order_and_rejects_shape_mismatch() -> None:
    truth = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    shuffled = truth[[2, 0, 1]]
    metrics, perm = score_reconstruction(
        Reconstruction(images=shuffled, labels=torch.tensor([1, 2, 2])),
        truth,
        torch.tensor([2, 1, 2]),
    )
    assert perm.tolist() == [1, 2, 0]
    assert metrics["psnr"] == 100.0 and metrics["ssim"] == pytest.approx(1.0)
    assert metrics["label_accuracy"] == 1.0 and metrics["labels_exact"] == 1.0
    with pytest.raises(ValueError, match="reconstructed"):
        score_reconstruction(Reconstruction(images=truth[:2]), truth, torch.tensor([0, 0, 0]))


SCHEMA = TabularSchema(
    ("age",), ("sex",), (2,), (("female", "male"),), numeric_mean=(50.0,), numeric_std=(10.0,)
)
TEXT = TextSchema(("<pad>", "<unk>", "chest", "pain", "no", "fever"), max_length=3)
MULTI = TaskInfo("m", "multimodal", (5,), 2, None, ("n", "y"), tabular=SCHEMA, text=TEXT)


def test_score_inputs_scores_each_modality_on_its_own_columns() -> None:
    truth = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.0], [1.0, 0.0, 4.0, 5.0, 2.0]])
    rec = Reconstruction(
        rows=truth[[1, 0], :2],  # the attacker's order carries no meaning
        tokens=torch.tensor([[4, 5, 3], [2, 3, 0]]),
        bag=torch.tensor([2, 3, 5]),
        kept=torch.tensor([True, False]),
    )
    metrics, shown = score_inputs(rec, truth, MULTI, reference=truth)
    assert metrics["feature_accuracy"] == 1.0
    assert metrics["kept_rows"] == 1.0
    assert metrics["rouge1"] < 1.0  # the second sentence got one word wrong
    # the bag's recall and precision (which words leaked) win over the sentences' own
    assert metrics["token_recall"] == 0.75 and metrics["token_precision"] == 1.0
    first, second = shown["rows"]
    assert first["truth"] == {"age": 50.0, "sex": "male"} and first["kept"] is False
    assert second["reconstructed"] == {"age": 60.0, "sex": "female"} and second["kept"] is True
    assert [t["truth"] for t in shown["texts"]] == ["chest pain", "no fever chest"]
    assert shown["texts"][0]["reconstructed"] == "chest pain"
    assert shown["bag"] == {
        "item": "token",
        "recovered": ["chest", "pain", "fever"],
        "false": [],
        "missed": ["no"],
    }


def test_score_inputs_refuses_rows_of_a_task_without_a_schema() -> None:
    image = TaskInfo("d", "image", (1, 2, 2), 2, None, ("a", "b"))
    with pytest.raises(ValueError, match="no tabular schema"):
        score_inputs(Reconstruction(rows=torch.zeros(1, 2)), torch.zeros(1, 1, 2, 2), image)
    assert bag_names(image) == ()


@pytest.mark.parametrize(
    ("metrics", "level"),
    [
        ({"psnr": 25.0, "ssim": 0.8}, "high"),
        ({"psnr": 12.0, "ssim": 0.6}, "high"),
        ({"psnr": 16.0, "ssim": 0.3}, "medium"),
        ({"psnr": 10.0, "ssim": 0.1}, "low"),
        ({"label_accuracy": 0.95}, "medium"),
        ({"label_accuracy": 0.5}, "low"),
        ({"feature_accuracy": 0.95, "feature_accuracy_random": 0.54}, "high"),
        ({"feature_accuracy": 0.7, "feature_accuracy_random": 0.54}, "medium"),
        ({"feature_accuracy": 0.58, "feature_accuracy_random": 0.54, "label_accuracy": 1.0}, "low"),
        ({"rouge1": 0.96, "rouge2": 0.7, "token_recall": 1.0, "token_precision": 1.0}, "high"),
        ({"rouge1": 0.3, "rouge2": 0.0, "token_recall": 0.3, "token_precision": 0.3}, "low"),
        ({"token_recall": 1.0, "token_precision": 1.0}, "high"),
        ({"token_recall": 0.6, "token_precision": 0.2}, "medium"),
        ({"token_recall": 1.0, "token_precision": 0.01}, "low"),  # the whole vocabulary
        ({"code_recall": 0.2, "code_precision": 1.0}, "low"),
    ],
)
def test_risk_levels(metrics: dict, level: str) -> None:
    item = {"attack": "a", "status": "ok", "client": 0, "round": 1, "metrics": metrics}
    assert assess([item])["level"] == level


def test_a_joint_reconstruction_gets_a_finding_per_modality() -> None:
    metrics = {"feature_accuracy": 0.95, "feature_accuracy_random": 0.5, "rouge1": 0.6}
    item = {"attack": "joint", "status": "ok", "client": 0, "round": 1, "metrics": metrics}
    findings = assess([item])["findings"]
    assert len(findings) == 2
    assert "records" in findings[0] and "ROUGE-1 0.60" in findings[1]


def test_load_report_rejects_foreign_json(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "report.json", {"schema": 1})
    with pytest.raises(GradauditError, match="missing keys"):
        load_report(tmp_path)
    atomic_write_json(
        tmp_path / "report.json",
        {k: {} for k in ("scenario", "utility", "attacks", "risk", "threat")} | {"schema": 9},
    )
    with pytest.raises(GradauditError, match="schema 9"):
        load_report(tmp_path)


def test_atomic_write_refuses_nan_and_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"bad": float("nan")})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
