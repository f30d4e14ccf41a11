"""Per-example clipping (DP-SGD) against a micro-batch loop, and the noise it adds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradaudit.data import load_dataset
from gradaudit.defenses.dp import (
    clip_factors,
    clip_update,
    dp_sgd_gradient,
    next_clip_norm,
    per_example_gradients,
    update_noise_multiplier,
)
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _micro_batch_clipped_sum(model, x, y, clip_norm):
    """The oracle: one example at a time, plain autograd, clip, sum."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(
            nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params
        )
        norm = torch.cat([g.reshape(-1) for g in grads]).norm()
        factor = min(1.0, clip_norm / float(norm))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return total


@pytest.mark.parametrize("kind", ["mlp", "lenet"])
def test_vectorised_clipping_equals_the_micro_batch_loop(digits, kind) -> None:
    model = build_model(kind, {}, digits.info, generator=torch_generator(0, "m"))
    x, y = digits.x_train[:16], digits.y_train[:16]
    grads = per_example_gradients(model, x, y)
    factors, norms = clip_factors(grads, 0.5)
    assert int((factors < 1).sum()) > 0  # the clip binds for some examples
    oracle = _micro_batch_clipped_sum(model, x, y, 0.5)
    for (name, _), expected in zip(model.named_parameters(), oracle, strict=True):
        got = torch.einsum("b,b...->...", factors, grads[name])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert norms.shape == (16,)


def test_noise_has_the_promised_scale(digits) -> None:
    model = build_model("mlp", {"hidden": [8]}, digits.info, generator=torch_generator(0, "m"))
    x, y = digits.x_train[:0], digits.y_train[:0]  # an empty Poisson batch: pure noise
    out = dp_sgd_gradient(
        model,
        x,
        y,
        clip_norm=2.0,
        noise_multiplier=1.5,
        expected_batch_size=4.0,
        generator=torch_generator(0, "noise"),
    )
    flat = torch.cat([v.reshape(-1) for v in out.values()])
    assert flat.numel() > 500
    assert float(flat.std()) == pytest.approx(1.5 * 2.0 / 4.0, rel=0.1)
    assert abs(float(flat.mean())) < 0.05


def test_batchnorm_on_batch_statistics_is_refused(digits) -> None:
    model = build_model(
        "resnet", {"depth": 8, "width": 4}, digits.info, generator=torch_generator(0, "m")
    )
    model.train()
    with pytest.raises(ValueError, match="BatchNorm"):
        per_example_gradients(model, digits.x_train[:2], digits.y_train[:2])


def test_update_clipping() -> None:
    update = {"w": torch.tensor([6.0, 8.0]), "running_mean": torch.tensor([100.0])}
    clipped, norm = clip_update(update, ["w"], 5.0)
    assert norm == pytest.approx(10.0)
    torch.testing.assert_close(clipped["w"], torch.tensor([3.0, 4.0]))
    assert clipped["running_mean"] is update["running_mean"]
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update(update, ["w"], 0.0)


def _drive_adaptive_clipping(start: float, sign: float = 1.0, rounds: int = 300) -> list[float]:
    """Clients' update norms are log-normal with median 1; 100 clients a round."""
    norms_rng = torch_generator(0, "norms")
    noise_rng = torch_generator(0, "count")
    clip, history = start, []
    for _ in range(rounds):
        norms = torch.exp(0.5 * torch.randn(100, generator=norms_rng))
        unclipped = int((norms <= clip).sum())
        step, _ = next_clip_norm(
            clip,
            unclipped,
            100,
            target_unclipped_quantile=0.5,
            learning_rate=0.2 * sign,
            count_noise=100 / 20,
            generator=noise_rng,
        )
        clip = step
        history.append(clip)
    return history


@pytest.mark.parametrize("start", [0.1, 10.0])
def test_adaptive_clipping_converges_to_the_median_norm(start) -> None:
    history = _drive_adaptive_clipping(start)
    tail = history[-50:]
    assert 0.85 < sum(tail) / len(tail) < 1.15
    assert all(0.6 < c < 1.6 for c in tail)


def test_adaptive_clipping_with_the_sign_reversed_diverges() -> None:
    # The bug this guards against (flwr's adaptive clipping moved C the wrong way).
    history = _drive_adaptive_clipping(10.0, sign=-1.0, rounds=60)
    assert history[-1] > 1e3


def test_update_noise_multiplier_keeps_the_total() -> None:
    z_update = update_noise_multiplier(1.2, 3.0)
    # Composition of the two Gaussians (RDP of a Gaussian is alpha / (2 z^2); they add).
    assert z_update**-2 + (2 * 3.0) ** -2 == pytest.approx(1.2**-2)
    with pytest.raises(ValueError, match="count_noise"):
        update_noise_multiplier(1.0, 0.4)
