"""Passive membership attacks on one client's update, and FedMIA's per-round test."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from gradaudit.attacks import build_attack
from gradaudit.attacks.membership.temporal import loss_drops, one_tailed_evidence
from gradaudit.attacks.signals import record_losses
from gradaudit.data import load_dataset
from gradaudit.metrics.inference import auc
from gradaudit.models.mlp import MLP
from gradaudit.threat import observe_batch, observe_fedavg

EPOCHS = 30


def shuffled_labels(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Labels no model can predict: only a client that trained on a record knows its label."""
    return torch.as_tensor(np.random.default_rng(seed).integers(0, 10, len(y)))


@pytest.fixture(scope="module")
def fitted():
    """A client that trains 30 epochs on 40 digits with random labels (a memorisation task);
    candidates: those 40 and 40 unseen ones."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = MLP(64, 10, [64])
    x, y = data.x_train[:40], shuffled_labels(data.y_train[:40], 0)
    obs = observe_fedavg(
        model,
        x.repeat(EPOCHS, 1, 1, 1),
        y.repeat(EPOCHS),
        data.info,
        lr=0.1,
        batch_size=8,
        knows=("architecture", "local_hyperparameters"),
    )
    cx = torch.cat([x, data.x_test[:40]])
    cy = torch.cat([y, shuffled_labels(data.y_test[:40], 1)])
    truth = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    obs = dataclasses.replace(obs, side_info={**obs.side_info, "candidates": {"x": cx, "y": cy}})
    return model, obs, truth


@pytest.mark.parametrize(
    ("kind", "params", "least"),
    [
        ("membership_loss", {}, 0.8),
        ("membership_loss", {"calibrate": False}, 0.8),
        ("membership_gradient", {}, 0.7),
        ("membership_gradient", {"statistic": "norm"}, 0.8),
    ],
)
def test_an_overfitted_client_gives_its_records_away(fitted, kind, params, least):
    model, obs, truth = fitted
    result = build_attack(kind, params).run(obs, model, rng=torch.Generator().manual_seed(0))
    assert result.status == "ok", result.reason
    scores = result.reconstruction.scores
    assert scores.dtype == torch.float64 and scores.shape == (80,)
    assert auc(scores.numpy(), truth) >= least


def test_losses_are_float64_where_float32_rounds_them_to_zero():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[20.0, 0.0], [0.0, 0.0]]))
    x = torch.tensor([[1.0, 0.0], [1.2, 0.0]])
    y = torch.tensor([0, 0])
    float32 = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
    assert float32.tolist() == [0.0, 0.0]  # both losses underflow in float32
    losses = record_losses(model, dict(model.state_dict()), x, y)
    assert losses.dtype == torch.float64 and losses[0] > losses[1] > 0


def test_membership_attacks_say_why_they_cannot_run(fitted):
    model, obs, _ = fitted
    bare = dataclasses.replace(
        obs, side_info={k: v for k, v in obs.side_info.items() if k != "candidates"}
    )
    assert "no candidate" in build_attack("membership_loss", {}).applicable(bare)
    aggregate_only = dataclasses.replace(obs, updates=(), aggregate=obs.updates[0].tensors)
    assert "only the aggregate" in build_attack("membership_gradient", {}).applicable(
        aggregate_only
    )
    data = load_dataset("digits")
    sgd = observe_batch(model, data.x_train[:4], data.y_train[:4], data.info)
    sgd = dataclasses.replace(sgd, side_info={**sgd.side_info, **{"candidates": {"x": 0, "y": 0}}})
    assert "learning rate" in build_attack("membership_loss", {}).applicable(sgd)
    assert build_attack("membership_gradient", {}).applicable(sgd) is None


def test_one_tailed_evidence_is_the_gaussian_log_cdf_by_hand():
    others = torch.tensor([[0.1, 0.4], [0.3, 0.2], [0.2, 0.0]], dtype=torch.float64)
    target = torch.tensor([0.5, 0.1], dtype=torch.float64)
    per_record = one_tailed_evidence(target, others, per_record=True)
    for j in range(2):
        column = others[:, j].numpy()
        z = (target[j].item() - column.mean()) / column.std(ddof=1)
        assert per_record[j].item() == pytest.approx(stats.norm.logcdf(z))
    fixed = one_tailed_evidence(target, others, per_record=False)
    spread = np.sqrt(others.numpy().var(axis=0, ddof=1).mean())
    expected = stats.norm.logcdf((target.numpy() - others.numpy().mean(0)) / spread)
    np.testing.assert_allclose(fixed.numpy(), expected)


def test_temporal_attack_tests_the_target_against_the_other_clients(fitted):
    model, obs, truth = fitted
    data = load_dataset("digits")
    views = []
    for offset in (100, 200, 300):  # three other clients that never saw the candidates
        other = observe_fedavg(
            model,
            data.x_train[offset : offset + 40].repeat(EPOCHS, 1, 1, 1),
            shuffled_labels(data.y_train[offset : offset + 40], offset).repeat(EPOCHS),
            data.info,
            lr=0.1,
            batch_size=8,
            client=offset,
        )
        views.append(dataclasses.replace(other.updates[0], client_id=offset // 100))
    both = dataclasses.replace(obs, updates=(obs.updates[0], *views))
    both = dataclasses.replace(both, history=(both,))
    x, y = both.side_info["candidates"]["x"], both.side_info["candidates"]["y"]
    assert set(loss_drops(model, both, x, y)) == {0, 1, 2, 3}
    result = build_attack("membership_temporal", {}).run(
        both, model, rng=torch.Generator().manual_seed(0)
    )
    assert result.status == "ok" and result.details["reference"] == "others"
    assert auc(result.reconstruction.scores.numpy(), truth) >= 0.8
    with_none = build_attack("membership_temporal", {"reference": "none"}).run(
        both, model, rng=torch.Generator()
    )
    assert with_none.details["reference"] == "none"
    lone = dataclasses.replace(obs, history=(obs,))
    assert "other clients" in build_attack(
        "membership_temporal", {"reference": "others"}
    ).applicable(lone)
