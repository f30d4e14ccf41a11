"""The keep rule's precision, PSNR-vs-seconds curves, and how both reach report.json and HTML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradaudit.attacks.inversion.image import InvertingGradientsAttack
from gradaudit.audit.render import ranking_sentence, validation_sentence
from gradaudit.audit.runner import run_audit
from gradaudit.audit.scoring import psnr_curve, rank_correlations, score_validation
from gradaudit.config import build_scenario
from gradaudit.errors import ConfigError
from gradaudit.types import AttackResult, Reconstruction

SCENARIO = {
    "name": "unit",
    "data": {"dataset": "digits", "num_clients": 3, "partition": {"kind": "iid"}},
    "model": {"kind": "mlp", "params": {"hidden": [16]}},
    "federation": {"rounds": 1, "local": {"batch_size": 3}},
    "threat": {"knows": ["architecture", "labels"]},
    "attacks": [{"kind": "inverting_gradients", "params": {"iterations": 5}}],
}


def _truth(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25


def test_keep_precision_and_recall_on_hand_built_results() -> None:
    truth = _truth()
    # the attacker's order: [truth 2 (exact), noise, truth 0 (exact), truth 1 + 0.05 (26 dB)]
    noise = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    rec = torch.cat([truth[2:3], noise, truth[0:1], truth[1:2] + 0.05])
    perm = torch.tensor([2, 3, 0, 1])  # truth 3 is matched to the noise
    confidence = torch.tensor([0.9, 0.7, 0.2, 0.6])  # keeps 0, 1 (noise) and 3; drops truth 0
    summary, rows = score_validation(rec, truth, perm, confidence, 0.5, torch.tensor([5, 6, 7, 8]))
    assert [r["image"] for r in rows] == [0, 1, 2, 3]
    assert [r["reconstruction"] for r in rows] == [2, 3, 0, 1]
    assert [r["label"] for r in rows] == [7, 8, 5, 6]
    assert [r["kept"] for r in rows] == [False, True, True, True]
    assert [r["recognisable"] for r in rows] == [True, True, True, False]
    assert [r["confidence"] for r in rows] == pytest.approx([0.2, 0.6, 0.9, 0.7])
    assert rows[0]["psnr"] == 100.0 and rows[1]["psnr"] == pytest.approx(26.0206, abs=1e-3)
    assert summary["kept"] == 3 and summary["recognisable"] == 3
    assert summary["kept_recognisable"] == 2
    assert summary["keep_precision"] == pytest.approx(2 / 3)
    assert summary["keep_recall"] == pytest.approx(2 / 3)
    assert summary["threshold"] == 0.5
    assert summary["recognisable_definition"] == "PSNR ≥ 20 dB or SSIM ≥ 0.5"


def test_nothing_kept_or_nothing_recognisable_leaves_the_ratio_undefined() -> None:
    truth = _truth(2)
    perm = torch.tensor([0, 1])
    summary, _ = score_validation(truth, truth, perm, torch.tensor([0.1, 0.2]), 0.5)
    assert summary["kept"] == 0 and summary["keep_precision"] is None
    assert summary["keep_recall"] == 0.0
    flat = torch.full_like(truth, 0.99)
    summary, _ = score_validation(flat, truth, perm, torch.tensor([0.9, 0.8]), 0.5)
    assert summary["recognisable"] == 0 and summary["keep_recall"] is None
    assert summary["keep_precision"] == 0.0


def test_rank_correlations() -> None:
    assert rank_correlations([0.1, 0.2, 0.3, 0.4], [10.0, 30.0, 20.0, 40.0]) == pytest.approx(
        {"spearman": 0.8, "kendall": 4 / 6}
    )
    assert rank_correlations([0.3, 0.2, 0.1], [1.0, 2.0, 3.0]) == {
        "spearman": -1.0,
        "kendall": -1.0,
    }
    assert rank_correlations([0.5], [20.0]) == {"spearman": None, "kendall": None}
    assert rank_correlations([0.5, 0.5, 0.5], [20.0, 10.0, 5.0])["spearman"] is None
    with pytest.raises(ValueError, match="quality"):
        rank_correlations([0.5, 0.4], [20.0])


def test_psnr_curve_from_hand_built_snapshots() -> None:
    truth = torch.zeros(2, 1, 4, 4)
    truth[1] = 0.5
    early = truth[[1, 0]] + 0.1  # shuffled order: matching must undo it; PSNR 20 dB each
    late = truth + torch.tensor([0.01, 0.1]).view(2, 1, 1, 1)  # 40 and 20 dB: mean 30
    curve = psnr_curve([(3.5, late), (0.25, early)], truth)
    assert curve == [[0.25, pytest.approx(20.0)], [3.5, pytest.approx(30.0)]]
    assert psnr_curve([], truth) == []
    with pytest.raises(ValueError, match="snapshot"):
        psnr_curve([(1.0, truth[:1])], truth)


def test_sentences_say_what_was_kept() -> None:
    base = {
        "method": "leave_one_out",
        "threshold": 0.6,
        "recognisable_definition": "PSNR ≥ 20 dB or SSIM ≥ 0.5",
        "spearman": None,
        "kendall": None,
    }
    text = validation_sentence(
        base
        | {"total": 4, "kept": 3, "recognisable": 4, "kept_recognisable": 3}
        | {"keep_precision": 1.0, "keep_recall": 0.75}
    )
    assert text.startswith("The attacker would keep 3 of 4 reconstructions (confidence ≥ 0.60)")
    assert "3 of those are recognisable" in text and "recall 75%" in text
    none_kept = validation_sentence(
        base
        | {"total": 1, "kept": 0, "recognisable": 0, "kept_recognisable": 0}
        | {"keep_precision": None, "keep_recall": None}
    )
    assert "keep none of its 1 reconstruction " in none_kept
    assert "nothing to miss" in none_kept
    assert validation_sentence({"method": None, "note": "validation failed: x"}) == (
        "validation failed: x"
    )
    assert ranking_sentence(base) is None


def _hand_built_run(truth: torch.Tensor):
    """An inverting_gradients stand-in: returns the truth for two images, noise for the third."""

    def run(self, obs, model, *, rng, progress=None):
        rec = truth.clone()
        rec[2] = torch.rand(rec[2].shape, generator=torch.Generator().manual_seed(1))
        return AttackResult(
            "inverting_gradients",
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(images=rec, labels=obs.side_info["labels"].clone()),
            seconds=2.0,
            trace=((1, 0.5, 0.3), (2, 2.0, 0.1)),
            snapshots=((0.5, torch.full_like(truth, 0.5)), (2.0, rec)),
        )

    return run


def test_report_has_validation_table_and_psnr_curve_and_resumes(tmp_path, monkeypatch) -> None:
    scenario = build_scenario(SCENARIO)
    truth = _truth_of(scenario, tmp_path / "probe", monkeypatch)
    monkeypatch.setattr(InvertingGradientsAttack, "run", _hand_built_run(truth))
    out = tmp_path / "out"
    report = run_audit(scenario, out)
    (entry,) = report["attacks"]
    rows = entry["per_example"]
    assert len(rows) == 3
    by_rec = {r["reconstruction"]: r for r in rows}
    confidences = [by_rec[k]["confidence"] for k in range(3)]
    assert min(confidences) == confidences[2] < 0.3  # the noise image is flagged
    assert [by_rec[k]["recognisable"] for k in range(3)] == [True, True, False]
    assert entry["validation"]["method"] == "leave_one_out"
    assert entry["validation"]["threshold"] == scenario.threat.keep_threshold == 0.75
    kept = [by_rec[k]["kept"] for k in range(3)]
    assert kept == [c >= 0.75 for c in confidences]
    assert entry["metrics"]["kept"] == sum(kept)
    assert {"keep_precision", "confidence_spearman", "confidence_kendall"} <= entry[
        "metrics"
    ].keys()
    assert [p[0] for p in entry["psnr_curve"]] == [0.5, 2.0]
    assert entry["psnr_curve"][1][1] == pytest.approx(entry["metrics"]["psnr"], abs=1e-3)
    assert "psnr_curve.png" in report["artifacts"] and (out / "psnr_curve.png").is_file()
    html = (out / "report.html").read_text()
    assert 'class="per-example"' in html and "Attacker-side validation." in html
    assert "PSNR of the best reconstruction so far" in html
    # resume: the cached entry carries everything the report needs
    (out / "report.json").unlink()

    def must_not_run(self, obs, model, *, rng, progress=None):
        raise AssertionError("the cached result should have been reused")

    monkeypatch.setattr(InvertingGradientsAttack, "run", must_not_run)
    again = run_audit(scenario, out)
    assert again["attacks"] == report["attacks"]
    assert "psnr_curve.png" in again["artifacts"]
    assert 'class="per-example"' in (out / "report.html").read_text()
    saved = json.loads((out / "report.json").read_text())
    assert saved["attacks"][0]["per_example"] == rows


def _truth_of(scenario, out: Path, monkeypatch) -> torch.Tensor:
    """The target's private images, as the runner's scorer sees them (a probing run)."""
    from gradaudit.audit import runner

    seen: dict = {}
    real = runner._entry

    def grab(result, index, out_dir, true_images, *args):
        seen["truth"] = true_images
        return real(result, index, out_dir, true_images, *args)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "_entry", grab)
        run_audit(scenario, out)
    return seen["truth"]


def test_keep_threshold_is_a_validated_scenario_field() -> None:
    assert build_scenario(SCENARIO).threat.keep_threshold == 0.75
    raised = build_scenario(SCENARIO | {"threat": {"keep_threshold": 0.9}})
    assert raised.threat.keep_threshold == 0.9
    with pytest.raises(ConfigError, match="keep_threshold"):
        build_scenario(SCENARIO | {"threat": {"keep_threshold": 1.5}})
