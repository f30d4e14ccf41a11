"""The round loop's hooks for audits and malicious servers: crafted clients and edited models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradaudit.config import ComponentSpec, FederationSpec, LocalSpec
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.defenses import build_client_defenses
from gradaudit.defenses.base import DefenseContext
from gradaudit.federation import run_federation, train_clients_loop
from gradaudit.federation.loop import CraftedClient, FederationResult
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


@pytest.fixture(scope="module")
def parts(digits):
    return partition_dataset(
        "iid", {}, digits.y_train.numpy(), 4, rng=numpy_rng(0, "partition"), groups=None
    )


def _model(digits):
    return build_model("mlp", {"hidden": [16]}, digits.info, generator=torch_generator(0, "model"))


def _assert_same(a: FederationResult, b: FederationResult) -> None:
    assert a.final_state.keys() == b.final_state.keys()
    for key in a.final_state:
        assert torch.equal(a.final_state[key], b.final_state[key]), key
    assert [(r.sampled, r.test_accuracy, r.test_loss) for r in a.rounds] == [
        (r.sampled, r.test_accuracy, r.test_loss) for r in b.rounds
    ]
    for rnd, cap in a.captures.items():
        other = b.captures[rnd]
        for u, v in zip(cap.updates, other.updates, strict=True):
            assert u.client_id == v.client_id
            for key in u.tensors:
                assert torch.equal(u.tensors[key], v.tensors[key]), (rnd, u.client_id, key)


@pytest.mark.parametrize("engine", ["vectorised", "loop"])
def test_no_edit_and_no_canary_leave_the_run_bit_identical(digits, parts, engine) -> None:
    # Prepare
    fed = FederationSpec(
        algorithm="fedavg", rounds=2, engine=engine, local=LocalSpec(steps=3, batch_size=16)
    )
    # Execute: the defaults, explicit None, and hooks that change nothing
    plain = run_federation(_model(digits), digits, parts, fed, seed=0, capture_rounds={1, 2})
    nones = run_federation(
        _model(digits),
        digits,
        parts,
        fed,
        seed=0,
        capture_rounds={1, 2},
        server_edit=None,
        crafted=None,
    )
    empty = run_federation(
        _model(digits),
        digits,
        parts,
        fed,
        seed=0,
        capture_rounds={1, 2},
        server_edit=lambda rnd, state: {},
        crafted={},
    )
    # Assert
    _assert_same(plain, nones)
    _assert_same(plain, empty)
    assert all(not c.sent for c in empty.captures.values())


def test_edit_that_sends_the_global_model_changes_nothing(digits, parts) -> None:
    # The edited path (the client trains alone, from the state it received) computes the same
    # update as the shared path when what it received is the global model (loop engine).
    fed = FederationSpec(algorithm="fedavg", rounds=2, engine="loop", local=LocalSpec(steps=3))
    plain = run_federation(_model(digits), digits, parts, fed, seed=0, capture_rounds={1, 2})
    same = run_federation(
        _model(digits),
        digits,
        parts,
        fed,
        seed=0,
        capture_rounds={1, 2},
        server_edit=lambda rnd, state: {1: {k: v.clone() for k, v in state.items()}},
    )
    _assert_same(plain, same)
    assert set(same.captures[2].sent) == {1}


def test_edited_client_trains_from_what_it_received(digits, parts) -> None:
    # Prepare: the server sends client 2 a shifted model in round 2
    fed = FederationSpec(algorithm="fedavg", rounds=2, local=LocalSpec(steps=2, batch_size=8))

    def edit(rnd, state):
        if rnd != 2:
            return {}
        return {2: {k: v + 0.05 if v.is_floating_point() else v for k, v in state.items()}}

    # Execute
    honest = run_federation(_model(digits), digits, parts, fed, seed=0, capture_rounds={2})
    result = run_federation(
        _model(digits), digits, parts, fed, seed=0, capture_rounds={2}, server_edit=edit
    )
    # Assert: the capture records what client 2 received; the others got the global model
    cap = result.captures[2]
    assert set(cap.sent) == {2}
    for key, value in cap.global_state.items():
        assert torch.equal(value, honest.captures[2].global_state[key])  # round 1 was honest
        expected = value + 0.05 if value.is_floating_point() else value
        assert torch.equal(cap.received(2)[key], expected)
        assert torch.equal(cap.received(0)[key], value)
    # client 2's update is its local training from the edited model (same batches)
    plan = cap.plans[2]
    model = _model(digits)
    (expected_update,) = train_clients_loop(
        model, cap.sent[2], digits.x_train, digits.y_train, [plan], algorithm="fedavg", lr=0.1
    )
    update = next(u for u in cap.updates if u.client_id == 2)
    for key in expected_update:
        torch.testing.assert_close(update.tensors[key], expected_update[key], rtol=1e-5, atol=1e-6)
    # the other clients' updates are untouched by the edit
    for u, v in zip(cap.updates, honest.captures[2].updates, strict=True):
        if u.client_id != 2:
            for key in u.tensors:
                assert torch.equal(u.tensors[key], v.tensors[key])


def test_an_edit_must_match_the_model(digits, parts) -> None:
    fed = FederationSpec(algorithm="fedsgd", rounds=1)
    with pytest.raises(ValueError, match="keys differ"):
        run_federation(
            _model(digits), digits, parts, fed, seed=0, server_edit=lambda rnd, state: {0: {}}
        )


def test_crafted_client_update_is_aggregated_as_sent(digits, parts) -> None:
    # Prepare: a fifth client with no data sends a fixed model change
    fed = FederationSpec(algorithm="fedavg", rounds=1, local=LocalSpec(steps=1, batch_size=4))
    model = _model(digits)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    change = {k: torch.full_like(v, 0.5) for k, v in initial.items()}
    indices = [*parts, np.zeros(0, np.int64)]
    crafted = {4: CraftedClient(update=lambda rnd, received: change, num_examples=100)}
    # Execute
    result = run_federation(
        model, digits, indices, fed, seed=0, capture_rounds={1}, crafted=crafted
    )
    honest = run_federation(_model(digits), digits, parts, fed, seed=0, capture_rounds={1})
    # Assert: FedAvg weights the canary by its claimed count; the real updates are unchanged
    cap = result.captures[1]
    canary = next(u for u in cap.updates if u.client_id == 4)
    assert canary.num_examples == 100 and cap.plans[4].steps == ()
    real = [u for u in cap.updates if u.client_id != 4]
    for u, v in zip(real, honest.captures[1].updates, strict=True):
        for key in u.tensors:
            assert torch.equal(u.tensors[key], v.tensors[key])
    total = sum(u.num_examples for u in cap.updates)
    key = "head.bias"
    expected = sum(u.tensors[key].double() * u.num_examples for u in cap.updates) / total
    torch.testing.assert_close(
        result.final_state[key].double(), initial[key].double() + expected, rtol=1e-6, atol=1e-6
    )


def test_crafted_client_goes_through_the_client_defenses(digits, parts) -> None:
    # Prepare: DP-FedAvg clips every update, the canary's too
    fed = FederationSpec(algorithm="fedavg", rounds=1, local=LocalSpec(steps=1))
    model = _model(digits)
    indices = [*parts, np.zeros(0, np.int64)]
    context = DefenseContext(
        model=model,
        federation=fed,
        client_sizes=tuple(len(c) for c in indices),
        task=digits.info,
    )
    stack = build_client_defenses(
        [ComponentSpec(kind="dp_gaussian", params={"clip_norm": 0.25, "noise_multiplier": 0.1})],
        context,
    )
    big = {k: torch.full_like(v, 3.0) for k, v in model.state_dict().items()}
    # Execute
    result = run_federation(
        model,
        digits,
        indices,
        fed,
        seed=0,
        capture_rounds={1},
        defenses=stack,
        crafted={4: CraftedClient(update=lambda rnd, received: big, num_examples=1)},
    )
    # Assert
    canary = next(u for u in result.captures[1].updates if u.client_id == 4)
    norm = torch.sqrt(sum((v.double() ** 2).sum() for v in canary.tensors.values()))
    assert float(norm) == pytest.approx(0.25, rel=1e-5)


def test_crafted_ids_must_be_clients(digits, parts) -> None:
    fed = FederationSpec(algorithm="fedsgd", rounds=1)
    crafted = {9: CraftedClient(update=lambda rnd, received: received, num_examples=1)}
    with pytest.raises(ValueError, match="crafted clients"):
        run_federation(_model(digits), digits, parts, fed, seed=0, crafted=crafted)
