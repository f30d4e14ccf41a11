"""Attacker-side validation: confidence from the update alone, checked where the truth is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradaudit.attacks.base import attacker_model, gradient_estimate
from gradaudit.attacks.validation import (
    leave_one_out_cosines,
    reconstruction_confidence,
    validate_reconstruction,
)
from gradaudit.data import load_dataset
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch

IDX = torch.tensor([3, 17, 42])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _mlp(digits) -> nn.Module:
    return build_model("mlp", {"hidden": [32]}, digits.info, generator=torch_generator(0, "m"))


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)
    )


def _attacker_view(model, digits, idx, *, train_mode=True):
    """What the server holds: the global model copy and the target's gradient estimate."""
    obs = observe_batch(
        model, digits.x_train[idx], digits.y_train[idx], digits.info, train_mode=train_mode
    )
    target, _ = gradient_estimate(obs.updates[0], obs)
    return attacker_model(model, obs), target


def _noise(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("count", [1, 3])
def test_the_true_images_get_confidence_one(digits, count: int) -> None:
    idx = IDX[:count]
    attacker, target = _attacker_view(_mlp(digits), digits, idx)
    result = reconstruction_confidence(
        attacker, digits.x_train[idx], digits.y_train[idx], target, train_mode=True
    )
    assert result.method == "leave_one_out"
    assert result.confidence.shape == (count,)
    assert torch.allclose(result.confidence, torch.ones(count, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("center", [True, False])
def test_a_random_image_gets_a_lower_confidence(digits, center: bool) -> None:
    idx = IDX[:1]
    attacker, target = _attacker_view(_mlp(digits), digits, idx)
    noise = _noise((1, *digits.info.input_shape), 1)
    true_conf, noise_conf = (
        float(
            reconstruction_confidence(
                attacker, x, digits.y_train[idx], target, train_mode=True, center=center
            ).confidence[0]
        )
        for x in (digits.x_train[idx], noise)
    )
    assert true_conf == pytest.approx(1.0, abs=1e-5)
    assert noise_conf < 0.9


def test_leave_one_out_at_batch_three_flags_exactly_the_wrong_image(digits) -> None:
    attacker, target = _attacker_view(_mlp(digits), digits, IDX)
    for wrong in range(3):
        x = digits.x_train[IDX].clone()
        x[wrong] = _noise(x[wrong].shape, wrong)
        conf = reconstruction_confidence(
            attacker, x, digits.y_train[IDX], target, train_mode=True
        ).confidence
        others = [float(c) for i, c in enumerate(conf) if i != wrong]
        assert int(conf.argmin()) == wrong
        assert float(conf[wrong]) < min(others) - 0.2, conf.tolist()


def test_the_blank_image_gets_zero_when_centred(digits) -> None:
    idx = IDX[:1]
    attacker, target = _attacker_view(_mlp(digits), digits, idx)
    blank = torch.zeros(1, *digits.info.input_shape)
    conf = reconstruction_confidence(attacker, blank, digits.y_train[idx], target, train_mode=True)
    assert float(conf.confidence[0]) == 0.0


def test_batchnorm_in_train_mode_falls_back_to_one_batch_value(digits) -> None:
    model = _bn_net()
    attacker, target = _attacker_view(model, digits, IDX, train_mode=True)
    stats_before = {k: v.clone() for k, v in attacker.state_dict().items()}
    x = digits.x_train[IDX].clone()
    exact = reconstruction_confidence(attacker, x, digits.y_train[IDX], target, train_mode=True)
    assert exact.method == "batch" and "BatchNorm" in exact.note
    assert torch.allclose(exact.confidence, torch.ones(3, dtype=torch.float64), atol=1e-5)
    x[1] = _noise(x[1].shape, 5)
    coupled = reconstruction_confidence(attacker, x, digits.y_train[IDX], target, train_mode=True)
    assert len(set(coupled.confidence.tolist())) == 1 and float(coupled.confidence[0]) < 0.99
    for key, value in attacker.state_dict().items():  # running statistics left untouched
        assert torch.equal(value, stats_before[key]), key


def test_batchnorm_on_frozen_statistics_is_attributed_per_image(digits) -> None:
    attacker, target = _attacker_view(_bn_net(), digits, IDX, train_mode=False)
    x = digits.x_train[IDX].clone()
    x[2] = _noise(x[2].shape, 2)
    conf = reconstruction_confidence(attacker, x, digits.y_train[IDX], target, train_mode=False)
    assert conf.method == "leave_one_out"
    assert int(conf.confidence.argmin()) == 2


def test_unknown_scale_of_a_model_change_is_fitted(digits) -> None:
    attacker, target = _attacker_view(_mlp(digits), digits, IDX)
    scaled = {k: 0.37 * v for k, v in target.items()}  # e.g. -delta without the learning rate
    x, y = digits.x_train[IDX], digits.y_train[IDX]
    fitted = reconstruction_confidence(attacker, x, y, scaled, train_mode=True, fit_scale=True)
    unfitted = reconstruction_confidence(attacker, x, y, scaled, train_mode=True)
    assert torch.allclose(fitted.confidence, torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert float(unfitted.confidence.max()) < 0.99


def test_leave_one_out_residuals_by_hand() -> None:
    per_example = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    target = torch.tensor([0.5, 1.0, 1.0])  # the second example really had [0, 2, 2]
    conf = leave_one_out_cosines(per_example, target, fit_scale=False)
    # r_0 = 2 g - g_1 = [1, 0, 2]: cos([1,0,0], r_0) = 1/sqrt(5); r_1 = [0, 2, 2]: 1/sqrt(2)
    assert conf.tolist() == pytest.approx([5**-0.5, 2**-0.5])


def test_unknown_label_of_a_single_image_is_the_most_confident_class(digits) -> None:
    idx = IDX[:1]
    attacker, target = _attacker_view(_mlp(digits), digits, idx)
    found = validate_reconstruction(attacker, digits.x_train[idx], None, target, train_mode=True)
    assert float(found.confidence[0]) == pytest.approx(1.0, abs=1e-5)
    assert f"({int(digits.y_train[idx][0])})" in found.note
    with pytest.raises(ValueError, match="without labels"):
        validate_reconstruction(attacker, digits.x_train[IDX], None, target, train_mode=True)


def test_mismatched_inputs_are_refused(digits) -> None:
    attacker, target = _attacker_view(_mlp(digits), digits, IDX)
    with pytest.raises(ValueError, match="labels"):
        reconstruction_confidence(
            attacker, digits.x_train[IDX], digits.y_train[:2], target, train_mode=True
        )
    with pytest.raises(ValueError, match="none of the model's parameters"):
        reconstruction_confidence(
            attacker, digits.x_train[IDX], digits.y_train[IDX], {}, train_mode=True
        )
