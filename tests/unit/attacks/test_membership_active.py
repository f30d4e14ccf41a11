"""Nasr et al.'s active membership attack: a malicious server edits the target's model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from gradaudit.attacks.membership.active import (
    MembershipActiveAttack,
    MembershipActiveParams,
    ascend,
)
from gradaudit.attacks.membership.passive import MembershipLossAttack
from gradaudit.attacks.signals import record_losses
from gradaudit.config import FederationSpec, LocalSpec
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.federation import run_federation
from gradaudit.federation.loop import Capture
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator
from gradaudit.types import ClientUpdate, Observation

TARGET, ROUND = 0, 3


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


@pytest.fixture(scope="module")
def setup(digits):
    """40 clients of ~36 digits each, 5 local epochs; the target's records against as many
    held-out ones."""
    clients = partition_dataset(
        "iid", {}, digits.y_train.numpy(), 40, rng=numpy_rng(0, "partition"), groups=None
    )
    members = clients[TARGET]
    held = np.sort(np.random.default_rng(0).choice(len(digits.y_test), members.size, False))
    x = torch.cat([digits.x_train[members], digits.x_test[held]])
    y = torch.cat([digits.y_train[members], digits.y_test[held]])
    truth = np.r_[np.ones(members.size), np.zeros(held.size)]
    fed = FederationSpec(
        algorithm="fedavg", rounds=ROUND, local=LocalSpec(batch_size=8, lr=0.1, epochs=5)
    )
    return clients, fed, x, y, truth


def _model(digits):
    return build_model("mlp", {"hidden": [32]}, digits.info, generator=torch_generator(0, "model"))


def _side(x, y, **more):
    return {"architecture": True, "candidates": {"x": x, "y": y}, **more}


def _observation(digits, capture: Capture, side, *, sent=None) -> Observation:
    return Observation(
        round=capture.round,
        target_client=TARGET,
        global_params=capture.received(TARGET) if sent is None else sent,
        updates=capture.updates,
        aggregate=capture.aggregate,
        side_info={**side, "honest_global_params": capture.global_state},
        task=digits.info,
    )


def test_active_attack_beats_the_passive_one(digits, setup) -> None:
    # Prepare
    clients, fed, x, y, truth = setup
    side = _side(x, y, local_hyperparameters={"lr": 0.1})
    arch = _model(digits)
    attack = MembershipActiveAttack()
    assert attack.edits_model and attack.question == "membership"

    def edit(rnd, state):
        if rnd != ROUND:
            return {}
        obs = Observation(ROUND, TARGET, state, (), None, side, digits.info)
        return {TARGET: attack.edit(obs, arch)}

    # Execute: the honest run for the passive attack, the malicious one for the active
    honest = run_federation(_model(digits), digits, clients, fed, seed=0, capture_rounds={ROUND})
    malicious = run_federation(
        _model(digits), digits, clients, fed, seed=0, capture_rounds={ROUND}, server_edit=edit
    )
    gen = torch.Generator().manual_seed(0)
    passive = MembershipLossAttack().run(
        _observation(digits, honest.captures[ROUND], side), arch, rng=gen
    )
    active = attack.run(_observation(digits, malicious.captures[ROUND], side), arch, rng=gen)
    # Assert (measured with OMP_NUM_THREADS=1: passive 0.801, active 0.841)
    assert active.status == "ok" and passive.status == "ok"
    scores = active.reconstruction.scores
    assert scores.dtype == torch.float64 and scores.shape == (len(truth),)
    auc_active = roc_auc_score(truth, scores.numpy())
    auc_passive = roc_auc_score(truth, passive.reconstruction.scores.numpy())
    assert auc_active > 0.8
    assert auc_active > auc_passive + 0.02
    assert active.details["sent_model"] == "edited (gradient ascent on the candidates)"


def test_ascent_raises_every_candidate_loss(digits, setup) -> None:
    _, _, x, y, _ = setup
    model = _model(digits)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    edited = ascend(model, state, x, y, steps=2, lr=0.1)
    before, after = record_losses(model, state, x, y), record_losses(model, edited, x, y)
    assert bool((after > before).float().mean() > 0.9)
    assert edited.keys() == state.keys()
    for key, value in model.state_dict().items():  # the architecture is left as it was
        assert torch.equal(value, state[key])


def test_fedsgd_without_the_learning_rate_uses_the_first_order_drop(digits, setup) -> None:
    # Prepare: a FedSGD round whose gradient the server sees, no hyperparameters granted
    _, _, x, y, _ = setup
    model = _model(digits)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    loss = torch.nn.functional.cross_entropy(model(x[:8]), y[:8])
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    update = ClientUpdate(TARGET, 1, "gradient", {k: grads[k].detach() for k in state}, 8)
    obs = Observation(1, TARGET, state, (update,), None, _side(x, y), digits.info)
    # Execute
    result = MembershipActiveAttack(MembershipActiveParams(ascent_steps=1)).run(
        obs, model, rng=torch.Generator()
    )
    # Assert: the batch's records have the largest alignment with their own gradient
    assert result.status == "ok"
    assert "first order" in result.details["statistic"]
    scores = result.reconstruction.scores
    assert scores[:8].mean() > scores[8:].mean()


def test_not_applicable_on_the_aggregate_or_without_candidates(digits, setup) -> None:
    _, _, x, y, _ = setup
    model = _model(digits)
    state = model.state_dict()
    attack = MembershipActiveAttack()
    aggregate_only = Observation(1, TARGET, state, (), dict(state), _side(x, y), digits.info)
    result = attack.run(aggregate_only, model, rng=torch.Generator())
    assert result.status == "not_applicable" and "aggregate" in result.reason
    update = ClientUpdate(TARGET, 1, "delta", {k: torch.zeros_like(v) for k, v in state.items()}, 4)
    bare = Observation(1, TARGET, state, (update,), None, {"architecture": True}, digits.info)
    assert "candidate" in attack.applicable(bare)
    with pytest.raises(ValueError, match="candidates"):
        attack.edit(bare, model)
