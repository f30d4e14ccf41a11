"""LiRA: the statistic against a hand computation with scipy, and the attack on observations."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from torch import nn

from gradaudit.attacks.membership.lira import (
    LiraAttack,
    LiraParams,
    attacked_model,
    fit_gaussians,
    lira_offline,
    lira_online,
    logit_confidence,
    shadow_data,
    shadow_schedule,
)
from gradaudit.attacks.membership.shadows import train_shadows
from gradaudit.models.mlp import MLP
from gradaudit.types import ClientUpdate, Observation, TaskInfo

TASK = TaskInfo("toy", "tabular", (6,), 4, None, ("a", "b", "c", "d"))

# 3 candidates x 6 shadows. Candidate 1 has 4 IN and 2 OUT shadows (even counts: the median
# averages the middle two); candidate 2 is IN for one shadow only, so its per-example IN
# variance is missing and falls back to the mean of the others'.
SHADOW_CONF = torch.tensor(
    [
        [2.0, -1.0, 0.5],
        [3.5, 0.0, 0.7],
        [1.0, -2.0, 0.1],
        [2.5, 1.5, -0.4],
        [0.2, -0.5, 0.9],
        [4.0, 0.5, -1.2],
    ],
    dtype=torch.float64,
)
KEEP = np.array(
    [
        [True, True, False],
        [True, True, False],
        [False, False, True],
        [True, True, False],
        [False, False, False],
        [False, True, False],
    ]
)
TARGET = torch.tensor([3.0, 0.2, 0.4], dtype=torch.float64)


def _by_hand(mask: np.ndarray, *, fixed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Medians and standard deviations the way the authors' reference code fits them."""
    conf = SHADOW_CONF.numpy()
    cols = [conf[mask[:, j], j] for j in range(conf.shape[1])]
    mean = np.array([np.median(c) for c in cols])
    if fixed:
        pooled = np.std(np.concatenate([c - m for c, m in zip(cols, mean, strict=True)]))
        return mean, np.full(len(cols), pooled)
    std = np.array([np.std(c) if c.size >= 2 else np.nan for c in cols])
    return mean, np.where(np.isnan(std), np.nanmean(std), std)


@pytest.mark.parametrize("fixed", [True, False])
def test_online_statistic_equals_the_gaussian_likelihood_ratio(fixed: bool) -> None:
    mu_in, sd_in = _by_hand(KEEP, fixed=fixed)
    mu_out, sd_out = _by_hand(~KEEP, fixed=fixed)
    c = TARGET.numpy()
    expected = norm.logpdf(c, mu_in, sd_in) - norm.logpdf(c, mu_out, sd_out)
    got = lira_online(TARGET, SHADOW_CONF, KEEP, fixed_variance=fixed)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fixed", [True, False])
def test_offline_statistic_is_one_sided_against_out(fixed: bool) -> None:
    mu_out, sd_out = _by_hand(~KEEP, fixed=fixed)
    expected = norm.logcdf(TARGET.numpy(), mu_out, sd_out)  # log(1 - Pr[Z > c])
    got = lira_offline(TARGET, SHADOW_CONF, KEEP, fixed_variance=fixed)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    far = lira_offline(torch.tensor([-1e3, 1e3, 0.0]), SHADOW_CONF, KEEP, fixed_variance=fixed)
    assert torch.isfinite(far).all() and far[0] < far[2] < far[1]


def test_record_without_in_shadows_takes_the_mean_in_median() -> None:
    keep = KEEP.copy()
    keep[:, 2] = False  # candidate 2 is never IN
    fit = fit_gaussians(SHADOW_CONF, torch.as_tensor(keep), fixed_variance=True)
    medians = [float(np.median(SHADOW_CONF.numpy()[keep[:, j], j])) for j in (0, 1)]
    assert fit.missing == 1
    assert float(fit.mean[2]) == pytest.approx(np.mean(medians))
    assert torch.isfinite(lira_online(TARGET, SHADOW_CONF, keep, fixed_variance=False)).all()
    with pytest.raises(ValueError, match="fewer than two"):
        fit_gaussians(SHADOW_CONF, torch.zeros(6, 3, dtype=torch.bool), fixed_variance=True)


def test_logit_confidence_is_the_scaled_logit_and_stable() -> None:
    logits = torch.tensor([[1.0, -0.5, 2.0], [0.3, 0.2, 0.1]])
    y = torch.tensor([2, 1])
    p = torch.softmax(logits.double(), dim=1)[torch.arange(2), y]
    expected = torch.log(p) - torch.log1p(-p)
    assert torch.allclose(logit_confidence(logits, y), expected, atol=1e-12)
    assert logit_confidence(logits.expand(3, 2, 3), y).shape == (3, 2)
    sure = logit_confidence(torch.tensor([[60.0, 0.0, 0.0]]), torch.tensor([0]))
    assert float(sure) == pytest.approx(60.0 - np.log(2.0))  # float32 softmax says p = 1


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError):
        LiraParams(shadow=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        LiraParams(shadows=1)
    with pytest.raises(ValidationError):
        LiraParams().shadows = 4  # type: ignore[misc]


# --- the attack on observations ------------------------------------------------------------

HYPER = {"algorithm": "fedavg", "lr": 0.5, "batch_size": 8, "epochs": 40, "steps": None}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def toy() -> dict[str, object]:
    """A client that memorised 24 random-label records; 24 more it never saw."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=gen)
    y = torch.randint(4, (48,), generator=gen)
    torch.manual_seed(0)
    model = MLP(6, 4, [32])
    start = _state(model)
    keep = np.zeros((1, 48), dtype=bool)
    keep[0, :24] = True
    trained = train_shadows(
        model,
        start,
        x,
        y,
        keep,
        optimizer="sgd",
        lr=HYPER["lr"],  # type: ignore[arg-type]
        batch_size=8,
        epochs=40,
        rng=np.random.default_rng(0),
    )
    delta = {k: trained[k][0] - start[k] for k in start}
    order = torch.as_tensor(np.random.default_rng(1).permutation(48))
    return {
        "model": model,
        "start": start,
        "final": {k: v + delta[k] for k, v in start.items()},
        "update": ClientUpdate(0, 1, "delta", delta, 24),
        "x": x[order],
        "y": y[order],
        "truth": (order < 24).numpy(),
    }


def _obs(toy: dict[str, object], **side: object) -> Observation:
    info: dict[str, object] = {
        "architecture": True,
        "local_hyperparameters": HYPER,
        "candidates": {"x": toy["x"], "y": toy["y"]},
    }
    info.update(side)
    info = {k: v for k, v in info.items() if v is not None}
    return Observation(1, 0, toy["start"], (toy["update"],), None, info, TASK)  # type: ignore[arg-type]


def test_lira_finds_the_members_of_the_local_model(toy) -> None:
    attack = LiraAttack(LiraParams(shadows=6))
    obs = _obs(toy)
    result = attack.run(obs, toy["model"], rng=torch.Generator().manual_seed(0))
    assert result.status == "ok", result.reason
    scores = result.reconstruction.scores
    assert scores.dtype == torch.float64 and scores.shape == (48,)
    assert roc_auc_score(toy["truth"], scores.numpy()) > 0.8
    again = attack.run(obs, toy["model"], rng=torch.Generator().manual_seed(0))
    assert torch.equal(again.reconstruction.scores, scores)
    details = result.details
    assert details["shadows"] == 6 and details["mode"] == "online"
    assert details["target_model"] == "global + the target's FedAvg delta"
    assert details["shadow_training"] == {
        "optimizer": "sgd",
        "lr": 0.5,
        "batch_size": 8,
        "epochs": 40,
    }
    assert details["candidates_without_in"] == 0 and details["shadow_seconds"] >= 0


def test_offline_lira_with_public_data_trains_only_on_it(toy) -> None:
    gen = torch.Generator().manual_seed(5)
    public = {"x": torch.randn(30, 6, generator=gen), "y": torch.randint(4, (30,), generator=gen)}
    obs = _obs(toy, public_data=public)
    params = LiraParams(shadows=4, mode="offline", variance="per_example", epochs=5)
    data = shadow_data(obs, params, toy["x"], toy["y"], np.random.default_rng(0))
    assert not data.keep[:, :48].any() and (data.keep[:, 48:].sum(axis=1) == 24).all()
    result = LiraAttack(params).run(obs, toy["model"], rng=torch.Generator().manual_seed(0))
    assert result.status == "ok" and result.details["public_data_used"] is True
    assert result.details["candidates_without_in"] == 48
    assert torch.isfinite(result.reconstruction.scores).all()


def test_final_model_target_trains_shadows_centrally(toy) -> None:
    gen = torch.Generator().manual_seed(5)
    public = {"x": torch.randn(40, 6, generator=gen), "y": torch.randint(4, (40,), generator=gen)}
    other = ClientUpdate(
        1, 1, "delta", {k: torch.zeros_like(v) for k, v in toy["start"].items()}, 36
    )
    obs = dataclasses.replace(
        _obs(toy, public_data=public, rounds=2),
        updates=(toy["update"], other),
        initial_params=toy["start"],
        final_params=toy["final"],
    )
    params = LiraParams(shadows=4, target_model="final")
    schedule, _ = shadow_schedule(params, obs)
    assert schedule is not None and (schedule.epochs, schedule.steps) == (80, None)
    data = shadow_data(obs, params, toy["x"], toy["y"], np.random.default_rng(0))
    assert (data.keep[:, 48:].sum(axis=1) == 24 + 36 - 24).all()  # up to the 60 known records
    short = LiraParams(shadows=4, target_model="final", epochs=3)
    result = LiraAttack(short).run(obs, toy["model"], rng=torch.Generator().manual_seed(0))
    assert result.status == "ok", result.reason
    assert result.details["target_model"] == "the final model"
    assert "approximation" in result.details
    assert result.details["shadow_training"]["epochs"] == 3  # type: ignore[index]


def test_schedules_follow_the_clients_training() -> None:
    def schedule(hyper: dict[str, object], **params: object):
        obs = Observation(1, 0, {}, (), None, {"local_hyperparameters": hyper}, TASK)
        return shadow_schedule(LiraParams(**params), obs)  # type: ignore[arg-type]

    fedsgd, _ = schedule({"algorithm": "fedsgd", "lr": 0.1, "batch_size": 4})
    assert fedsgd is not None and (fedsgd.epochs, fedsgd.steps) == (None, 1)
    steps, _ = schedule({"algorithm": "fedavg", "lr": 0.1, "batch_size": 4, "steps": 7})
    assert steps is not None and steps.steps == 7
    overridden, _ = schedule({"lr": 0.1, "batch_size": 4}, epochs=9, lr=0.01, optimizer="adam")
    assert overridden is not None and (overridden.epochs, overridden.lr) == (9, 0.01)
    assert overridden.optimizer == "adam"
    none, reason = schedule({}, target_model="final", lr=0.1, batch_size=4)
    assert none is None and "epochs" in str(reason)
    none, reason = schedule({"lr": 0.1, "batch_size": 4, "epochs": 1}, target_model="final")
    assert none is None and "rounds" in str(reason)


def test_fedsgd_target_is_one_step_along_the_gradient() -> None:
    global_params = {"w": torch.tensor([1.0, 2.0])}
    grad = ClientUpdate(0, 1, "gradient", {"w": torch.tensor([0.5, -1.0])}, 4)
    obs = Observation(1, 0, global_params, (grad,), None, {}, TASK)
    target, _ = attacked_model(obs, LiraParams(), lr=0.1)
    assert target is not None and torch.allclose(target.state["w"], torch.tensor([0.95, 2.1]))


def test_not_applicable_reasons(toy) -> None:
    attack = LiraAttack(LiraParams(shadows=2))
    model = toy["model"]
    assert "candidate" in str(attack.applicable(_obs(toy, candidates=None)))
    assert "architecture" in str(attack.applicable(_obs(toy, architecture=None)))
    assert "learning rate" in str(attack.applicable(_obs(toy, local_hyperparameters=None)))
    final = LiraAttack(LiraParams(target_model="final"))
    assert "final" in str(final.applicable(_obs(toy, rounds=2)))
    assert "rounds" in str(final.applicable(_obs(toy)))
    aggregate_only = dataclasses.replace(_obs(toy), updates=(), aggregate=toy["update"].tensors)
    result = attack.run(aggregate_only, model, rng=torch.Generator())
    assert result.status == "not_applicable" and "aggregate" in str(result.reason)
    batchnorm = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    assert "BatchNorm" in str(attack.applicable(_obs(toy), batchnorm))
    refused = attack.run(_obs(toy), batchnorm, rng=torch.Generator())
    assert refused.status == "not_applicable" and "BatchNorm" in str(refused.reason)
    assert attack.applicable(_obs(toy), model) is None
