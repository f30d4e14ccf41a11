"""Replaying the client's local computation: FedAvg unrolling and BatchNorm statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradaudit.attacks.base import gradient_estimate
from gradaudit.attacks.inversion.image import InvertingGradientsAttack, InvertingGradientsParams
from gradaudit.attacks.inversion.simulate import (
    LocalReplay,
    batchnorm_layers,
    bn_statistics_distance,
    bn_statistics_target,
    labelled_loss,
    local_replay,
    recording_batchnorm,
    replay_batches,
    simulated_update,
)
from gradaudit.data import load_dataset
from gradaudit.metrics import match_reconstructions, psnr
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch, observe_fedavg


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


INFORMED = ("architecture", "labels", "local_hyperparameters")


def test_replay_batches_cycle_through_the_candidates() -> None:
    assert [b.tolist() for b in replay_batches(3, 1, 4)] == [[0], [1], [2], [0]]
    assert [b.tolist() for b in replay_batches(4, 8, 1)] == [[0, 1, 2, 3]]


def test_unrolled_replay_reproduces_the_fedavg_delta_exactly(digits) -> None:
    model = build_model("mlp", {"hidden": [32]}, digits.info, generator=torch_generator(0, "m"))
    x, y = digits.x_train[:5], digits.y_train[:5]
    obs = observe_fedavg(model, x, y, digits.info, lr=0.5, batch_size=2, knows=INFORMED)
    update = obs.updates[0]
    replay = local_replay(update, obs, "auto")
    assert replay.unrolled and replay.steps == 3
    observed, _ = gradient_estimate(update, obs)
    simulated = simulated_update(model, x, labelled_loss(y), replay, create_graph=False)
    for (name, _), sim in zip(model.named_parameters(), simulated, strict=True):
        torch.testing.assert_close(sim, observed[name], rtol=1e-5, atol=1e-6)
    # One gradient is a poor stand-in for three large steps: the replay is what makes it exact.
    one = simulated_update(model, x, labelled_loss(y), LocalReplay(unrolled=False))
    names = [n for n, _ in model.named_parameters()]
    gap = sum(float((o.detach() - observed[n]).norm()) for n, o in zip(names, one, strict=True))
    assert gap > 1e-2


def test_replay_choice_follows_what_the_adversary_knows(digits) -> None:
    model = build_model("mlp", {"hidden": [8]}, digits.info, generator=torch_generator(0, "m"))
    x, y = digits.x_train[:2], digits.y_train[:2]
    blind = observe_fedavg(
        model, x, y, digits.info, lr=0.1, batch_size=1, knows=("architecture", "labels")
    )
    assert not local_replay(blind.updates[0], blind, "auto").unrolled
    with pytest.raises(ValueError, match="local_hyperparameters"):
        local_replay(blind.updates[0], blind, "always")
    informed = observe_fedavg(model, x, y, digits.info, lr=0.1, batch_size=1, knows=INFORMED)
    assert not local_replay(informed.updates[0], informed, "never").unrolled
    fedsgd = observe_batch(model, x, y, digits.info)
    assert not local_replay(fedsgd.updates[0], fedsgd, "always").unrolled


class _TinyBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("steps", [1, 3])
def test_batchnorm_statistics_match_only_at_the_truth(digits, steps) -> None:
    torch.manual_seed(0)
    model = _TinyBN()
    x, y = digits.x_train[:steps], digits.y_train[:steps]
    if steps == 1:
        obs = observe_batch(model, x, y, digits.info, train_mode=True)
    else:
        obs = observe_fedavg(
            model, x, y, digits.info, lr=0.1, batch_size=1, batchnorm="train", knows=INFORMED
        )
    update = obs.updates[0]
    layers = batchnorm_layers(model)
    target = bn_statistics_target(update, layers)
    assert target is not None
    running = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in layers}
    replay = local_replay(update, obs, "auto")

    def distance(candidate: torch.Tensor) -> float:
        model.load_state_dict(obs.global_params)
        model.train()
        with recording_batchnorm(model) as recorder:
            simulated_update(model, candidate, labelled_loss(y), replay, create_graph=False)
        return float(bn_statistics_distance(recorder, layers, running, target).detach())

    assert distance(x) < 1e-4
    assert distance(torch.randn(x.shape, generator=torch_generator(0, "n"))) > 0.1


def test_no_batchnorm_target_when_the_client_froze_it(digits) -> None:
    model = _TinyBN()
    obs = observe_batch(
        model, digits.x_train[:2], digits.y_train[:2], digits.info, train_mode=False
    )
    assert bn_statistics_target(obs.updates[0], batchnorm_layers(model)) is None


def test_inverting_gradients_unrolls_fedavg_local_steps(digits) -> None:
    model = build_model("mlp", {"hidden": [64]}, digits.info, generator=torch_generator(0, "m"))
    idx = torch.tensor([5, 40])
    x, y = digits.x_train[idx], digits.y_train[idx]
    truth = digits.info.normalization.denormalize(x)
    obs = observe_fedavg(model, x, y, digits.info, lr=1.0, batch_size=1, knows=INFORMED)
    scores = {}
    for mode in ("auto", "never"):
        params = InvertingGradientsParams(iterations=300, tv_weight=0.0, unroll=mode)
        result = InvertingGradientsAttack(params).run(obs, model, rng=torch_generator(0, "a"))
        rec = result.reconstruction.images
        scores[mode] = float(psnr(rec[match_reconstructions(rec, truth)], truth).mean())
        assert ("unrolled" in result.details["replay"]) == (mode == "auto")
    assert scores["auto"] > 25.0
    assert scores["auto"] > scores["never"] + 3.0
