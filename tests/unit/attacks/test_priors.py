"""The generative prior: seeded training that lowers the ELBO, and a cache that survives damage."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from gradaudit.attacks.inversion import priors
from gradaudit.attacks.inversion.priors import (
    PriorConfig,
    build_vae,
    cache_dir,
    data_fingerprint,
    elbo_loss,
    load_or_train_prior,
    one_hot,
    prior_key,
    prior_path,
    train_vae,
)
from gradaudit.data import load_dataset


@pytest.fixture(scope="module")
def public():
    """The digits test split in pixel space: the adversary's public data."""
    digits = load_dataset("digits", None)
    x = digits.info.normalization.denormalize(digits.x_test).clamp(0, 1)
    return x, digits.y_test


def _config(public, **changes) -> PriorConfig:
    x, y = public
    fields = {
        "dataset": "digits",
        "fingerprint": data_fingerprint(x, y),
        "input_shape": (1, 8, 8),
        "num_classes": 10,
        "latent_dim": 4,
        "width": 8,
        "epochs": 5,
        "batch_size": 64,
        "lr": 3e-3,
        "beta": 1.0,
        "seed": 0,
        "examples": int(x.shape[0]),
    }
    return PriorConfig(**{**fields, **changes})


def _mean_loss(vae, public) -> float:
    x, y = public
    with torch.no_grad():
        mu, logvar = vae.encoder(x, one_hot(y, 10))
        return float(elbo_loss(vae.decoder(mu, one_hot(y, 10)), x, mu, logvar, 1.0))


def test_key_depends_on_every_field_and_the_data(public) -> None:
    base = _config(public)
    assert prior_key(base) == prior_key(_config(public))
    for change in ({"epochs": 6}, {"seed": 1}, {"latent_dim": 5}, {"dataset": "mnist"}):
        assert prior_key(_config(public, **change)) != prior_key(base)
    x, y = public
    assert data_fingerprint(x[:-1], y[:-1]) != base.fingerprint


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GRADAUDIT_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("GRADAUDIT_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "gradaudit"


def test_training_is_seeded(public, tmp_path: Path) -> None:
    config = _config(public)
    a = load_or_train_prior(config, *public, root=tmp_path / "a")
    b = load_or_train_prior(config, *public, root=tmp_path / "b")
    assert not a.from_cache and not b.from_cache
    for (name, wa), wb in zip(
        a.decoder.state_dict().items(), b.decoder.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(wa, wb, rtol=0, atol=0, msg=name)
    other = load_or_train_prior(_config(public, seed=1), *public, root=tmp_path / "c")
    assert not torch.equal(other.decoder.fc.weight, a.decoder.fc.weight)


def test_trained_prior_beats_the_mean_image(public) -> None:
    """Reference: its ELBO bounds -log p(x) below the best independent-pixel model's BCE."""
    x, y = public
    mean_image = x.mean(dim=0, keepdim=True).expand_as(x).clamp(1e-4, 1 - 1e-4)
    reference = float(nn.functional.binary_cross_entropy(mean_image, x, reduction="sum")) / len(x)
    config = _config(public, epochs=20)
    untrained = build_vae(config, torch.Generator().manual_seed(0))
    trained, last_epoch = train_vae(config, x, y)
    assert _mean_loss(untrained, public) > reference  # about 44 nats against 27
    assert _mean_loss(trained, public) < reference
    assert last_epoch < reference


def test_second_call_reads_the_cache(public, tmp_path: Path, monkeypatch) -> None:
    config = _config(public)
    first = load_or_train_prior(config, *public, root=tmp_path)
    assert prior_path(config, tmp_path).is_file()

    def no_training(*_args, **_kwargs):
        raise AssertionError("the cached prior should have been used")

    monkeypatch.setattr(priors, "train_vae", no_training)
    second = load_or_train_prior(config, *public, root=tmp_path)
    assert second.from_cache and second.key == first.key
    assert second.final_loss == first.final_loss
    for wa, wb in zip(first.decoder.parameters(), second.decoder.parameters(), strict=True):
        assert torch.equal(wa, wb)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_config"])
def test_unusable_cache_file_is_a_miss_with_a_warning(
    public, tmp_path: Path, caplog, damage: str
) -> None:
    config = _config(public)
    path = prior_path(config, tmp_path)
    if damage == "other_config":  # a valid prior, but of another configuration
        other = load_or_train_prior(_config(public, seed=7), *public, root=tmp_path)
        shutil.copyfile(other.path, path)
    else:
        load_or_train_prior(config, *public, root=tmp_path)
        data = path.read_bytes()
        path.write_bytes(b"not a torch file" if damage == "garbage" else data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="gradaudit.attacks.inversion.priors"):
        again = load_or_train_prior(config, *public, root=tmp_path)
    assert not again.from_cache
    assert any("unusable cached prior" in r.getMessage() for r in caplog.records)
    assert load_or_train_prior(config, *public, root=tmp_path).from_cache  # rewritten whole


def test_data_that_does_not_match_the_config_is_refused(public, tmp_path: Path) -> None:
    x, y = public
    with pytest.raises(ValueError, match="does not match"):
        load_or_train_prior(_config(public), x, torch.roll(y, 1), root=tmp_path)
