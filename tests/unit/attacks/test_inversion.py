"""Inverting Gradients: reconstructs known images, respects budgets, refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from gradaudit.attacks.inversion.image import (
    InvertingGradientsAttack,
    InvertingGradientsParams,
    total_variation,
)
from gradaudit.data import load_dataset
from gradaudit.metrics import match_reconstructions, psnr
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _pixels(digits, idx):
    return digits.info.normalization.denormalize(digits.x_train[idx])


def test_total_variation_of_a_step_edge() -> None:
    x = torch.zeros(1, 1, 4, 4)
    x[..., 2:] = 1.0  # one vertical edge: 4 of the 12 horizontal differences are 1
    assert float(total_variation(x)) == pytest.approx(4 / 12)


def test_batch_one_reconstruction_is_close(digits) -> None:
    model = build_model("mlp", {"hidden": [64]}, digits.info, generator=torch_generator(0, "m"))
    idx = torch.tensor([5])
    obs = observe_batch(
        model,
        digits.x_train[idx],
        digits.y_train[idx],
        digits.info,
        knows=("architecture", "labels"),
    )
    attack = InvertingGradientsAttack(InvertingGradientsParams(iterations=400, tv_weight=0.0))
    result = attack.run(obs, model, rng=torch_generator(0, "a"))
    assert result.status == "ok"
    assert result.details["labels"] == "granted by the threat model"
    assert float(psnr(result.reconstruction.images, _pixels(digits, idx))[0]) > 25.0


def test_batch_four_with_recovered_labels(digits) -> None:
    model = build_model(
        "mlp", {"hidden": [128, 128]}, digits.info, generator=torch_generator(0, "m")
    )
    idx = torch.tensor([3, 17, 42, 99])
    obs = observe_batch(model, digits.x_train[idx], digits.y_train[idx], digits.info)
    attack = InvertingGradientsAttack(InvertingGradientsParams(iterations=800, tv_weight=0.01))
    result = attack.run(obs, model, rng=torch_generator(0, "a"))
    rec, truth = result.reconstruction.images, _pixels(digits, idx)
    assert result.details["labels"].startswith("recovered")
    assert sorted(result.reconstruction.labels.tolist()) == sorted(digits.y_train[idx].tolist())
    perm = match_reconstructions(rec, truth)
    assert float(psnr(rec[perm], truth).mean()) > 20.0
    assert len(result.trace) > 0 and result.trace[-1][0] == 800


def test_stops_at_max_seconds_and_keeps_best(digits) -> None:
    model = build_model("mlp", {"hidden": [16]}, digits.info, generator=torch_generator(0, "m"))
    obs = observe_batch(model, digits.x_train[:2], digits.y_train[:2], digits.info)
    attack = InvertingGradientsAttack(
        InvertingGradientsParams(iterations=10**7, max_seconds=0.3, restarts=3)
    )
    result = attack.run(obs, model, rng=torch_generator(0, "a"))
    assert result.status == "ok"
    assert result.details["iterations_run"] < 10**7
    best = min(t[2] for t in result.trace)
    assert result.details["objective"] <= best + 1e-12


def test_seeded_runs_repeat_exactly(digits) -> None:
    model = build_model("mlp", {"hidden": [32]}, digits.info, generator=torch_generator(0, "m"))
    obs = observe_batch(model, digits.x_train[:2], digits.y_train[:2], digits.info)
    attack = InvertingGradientsAttack(InvertingGradientsParams(iterations=50))
    first = attack.run(obs, model, rng=torch_generator(7, "a"))
    second = attack.run(obs, model, rng=torch_generator(7, "a"))
    assert torch.equal(first.reconstruction.images, second.reconstruction.images)


def test_not_applicable_on_tabular_and_large_batches(digits) -> None:
    cancer = load_dataset("breast_cancer", None)
    model = build_model("mlp", {}, cancer.info, generator=torch_generator(0, "m"))
    obs = observe_batch(model, cancer.x_train[:2], cancer.y_train[:2], cancer.info)
    attack = InvertingGradientsAttack(InvertingGradientsParams(max_images=1))
    assert "tabular" in attack.run(obs, model, rng=torch_generator(0, "a")).reason
    model = build_model("mlp", {}, digits.info, generator=torch_generator(0, "m"))
    obs = observe_batch(model, digits.x_train[:2], digits.y_train[:2], digits.info)
    assert "max_images=1" in attack.applicable(obs)
