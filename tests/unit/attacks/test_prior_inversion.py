"""prior_inversion: recovers what its generator can make, needs public data, keeps budgets."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from gradaudit.attacks import ATTACKS, build_attack
from gradaudit.attacks.inversion.prior import PriorInversionAttack, PriorInversionParams
from gradaudit.attacks.inversion.priors import one_hot
from gradaudit.data import load_dataset
from gradaudit.errors import ConfigError
from gradaudit.metrics import match_reconstructions, psnr
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch

SMALL_PRIOR = {"prior_epochs": 40, "prior_latent_dim": 8, "prior_width": 16}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    """One prior cache for the module: the prior trains once (about 2 s), then is read back."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADAUDIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def model(digits):
    return build_model("mlp", {"hidden": [64]}, digits.info, generator=torch_generator(0, "m"))


def _observe(digits, model, x, y, knows=("architecture", "labels", "public_data")):
    public = (digits.x_test, digits.y_test) if "public_data" in knows else None
    return observe_batch(model, x, y, digits.info, knows=knows, public_data=public)


def _psnr(result, truth) -> torch.Tensor:
    rec = result.reconstruction.images
    return psnr(rec[match_reconstructions(rec, truth)], truth)


def test_recovers_an_image_its_generator_makes(digits, model) -> None:
    """Oracle: a target inside the prior's range is found again by the latent search alone."""
    attack = PriorInversionAttack(
        PriorInversionParams(iterations=200, generator_iterations=0, **SMALL_PRIOR)
    )
    labels = torch.tensor([0, 3, 5, 8])
    prior = attack.prior(_observe(digits, model, digits.x_train[:4], labels))
    z = torch.randn(4, 8, generator=torch_generator(1, "target codes"))
    with torch.no_grad():
        truth = prior.decoder(z, one_hot(labels, 10))
    obs = _observe(digits, model, digits.info.normalization.normalize(truth), labels)
    result = attack.run(obs, model, rng=torch_generator(0, "a"))
    assert result.status == "ok"
    assert result.details["prior"]["cache"] == "hit"
    assert result.details["generator_iterations_run"] == 0
    assert float(_psnr(result, truth).min()) > 33.0
    assert result.reconstruction.labels.tolist() == labels.tolist()


def test_generator_stage_reaches_images_outside_the_prior(digits, model) -> None:
    """GIAS's second stage: fine-tuning the generator recovers a real digit far better."""
    idx = torch.tensor([5])
    truth = digits.info.normalization.denormalize(digits.x_train[idx])
    obs = _observe(digits, model, digits.x_train[idx], digits.y_train[idx])
    scores = {}
    for steps in (0, 200):
        params = PriorInversionParams(iterations=300, generator_iterations=steps, **SMALL_PRIOR)
        result = PriorInversionAttack(params).run(obs, model, rng=torch_generator(0, "a"))
        assert result.details["objective"] <= result.details["latent_objective"]
        scores[steps] = float(_psnr(result, truth)[0])
    assert scores[200] > 30.0
    assert scores[200] > scores[0] + 6.0


def test_recovered_labels_condition_the_generator(digits, model) -> None:
    idx = torch.tensor([3, 17])
    obs = _observe(
        digits,
        model,
        digits.x_train[idx],
        digits.y_train[idx],
        knows=("architecture", "public_data"),
    )
    params = PriorInversionParams(iterations=150, generator_iterations=50, **SMALL_PRIOR)
    result = PriorInversionAttack(params).run(obs, model, rng=torch_generator(0, "a"))
    assert result.details["labels"].startswith("recovered")
    assert sorted(result.reconstruction.labels.tolist()) == sorted(digits.y_train[idx].tolist())
    images = result.reconstruction.images
    assert images.shape == (2, 1, 8, 8) and 0.0 <= float(images.min()) <= float(images.max()) <= 1
    assert result.trace[-1][0] == result.details["iterations_run"] == 200


def test_not_applicable_without_public_data(digits, model) -> None:
    obs = _observe(
        digits, model, digits.x_train[:1], digits.y_train[:1], knows=("architecture", "labels")
    )
    attack = PriorInversionAttack(PriorInversionParams(**SMALL_PRIOR))
    result = attack.run(obs, model, rng=torch_generator(0, "a"))
    assert result.status == "not_applicable"
    assert "public_data" in result.reason
    assert attack.applicable(obs) == result.reason


def test_stops_at_max_seconds_and_keeps_the_best(digits, model) -> None:
    obs = _observe(digits, model, digits.x_train[:2], digits.y_train[:2])
    params = PriorInversionParams(
        iterations=10**6, generator_iterations=10**6, max_seconds=0.5, restarts=2, **SMALL_PRIOR
    )
    result = PriorInversionAttack(params).run(obs, model, rng=torch_generator(0, "a"))
    assert result.status == "ok"
    assert 0 < result.details["generator_iterations_run"] < 10**6
    assert result.details["iterations_run"] < 10**6
    assert result.details["objective"] <= min(t[2] for t in result.trace) + 1e-12
    assert result.reconstruction.confidence.tolist() == [-result.details["objective"]] * 2
    seconds = [t for t, _ in result.snapshots]
    assert len(seconds) >= 2 and seconds == sorted(seconds)
    assert torch.equal(result.snapshots[-1][1], result.reconstruction.images)


def test_params_are_strict_and_registered() -> None:
    assert "prior_inversion" in ATTACKS
    with pytest.raises(ConfigError, match=r"attacks\[0\]\.params\.iteratons"):
        build_attack("prior_inversion", {"iteratons": 5}, where="attacks[0].params")
    with pytest.raises(ConfigError, match="generator_iterations"):
        build_attack("prior_inversion", {"generator_iterations": -1})
    with pytest.raises(ValidationError, match="frozen"):
        PriorInversionParams().lr = 1.0  # type: ignore[misc]
