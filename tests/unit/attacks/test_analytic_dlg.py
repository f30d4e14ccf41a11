"""Oracles: `analytic` exact to 1e-5; `dlg` recovers a LeNet image (MSE < 1e-3) and label."""

from __future__ import annotations

import pytest
import torch

from gradaudit.attacks.inversion.analytic import AnalyticAttack, AnalyticParams
from gradaudit.data import load_dataset
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _pixels(digits, idx):
    return digits.info.normalization.denormalize(digits.x_train[idx]).clamp(0, 1)


def test_analytic_is_exact_at_batch_one(digits) -> None:
    model = build_model("mlp", {"hidden": [32]}, digits.info, generator=torch_generator(0, "m"))
    idx = torch.tensor([11])
    obs = observe_batch(model, digits.x_train[idx], digits.y_train[idx], digits.info)
    result = AnalyticAttack(AnalyticParams()).run(obs, model, rng=torch_generator(0, "a"))
    assert result.status == "ok"
    torch.testing.assert_close(
        result.reconstruction.images, _pixels(digits, idx), atol=1e-5, rtol=0
    )


def test_analytic_refuses_batches_and_conv_models(digits) -> None:
    attack = AnalyticAttack(AnalyticParams())
    mlp = build_model("mlp", {}, digits.info, generator=torch_generator(0, "m"))
    obs = observe_batch(mlp, digits.x_train[:2], digits.y_train[:2], digits.info)
    assert "needs one example" in attack.run(obs, mlp, rng=torch_generator(0, "a")).reason
    lenet = build_model("lenet", {}, digits.info, generator=torch_generator(0, "m"))
    obs = observe_batch(lenet, digits.x_train[:1], digits.y_train[:1], digits.info)
    assert "fully connected" in attack.run(obs, lenet, rng=torch_generator(0, "a")).reason


def test_dlg_recovers_lenet_image_and_label(digits) -> None:
    from gradaudit.attacks.inversion.dlg import DLGAttack, DLGParams

    model = build_model("lenet", {}, digits.info, generator=torch_generator(0, "m"))
    idx = torch.tensor([7])
    obs = observe_batch(model, digits.x_train[idx], digits.y_train[idx], digits.info)
    result = DLGAttack(DLGParams(iterations=60)).run(obs, model, rng=torch_generator(0, "a"))
    assert result.status == "ok"
    assert result.details["labels"].startswith("optimised")
    assert result.reconstruction.labels.tolist() == digits.y_train[idx].tolist()
    mse = float((result.reconstruction.images - _pixels(digits, idx)).pow(2).mean())
    assert mse < 1e-3
