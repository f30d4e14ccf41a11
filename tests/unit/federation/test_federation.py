"""Local training engines, client sampling and the round loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradaudit.config import FederationSpec
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.federation import plan_local_batches, run_federation
from gradaudit.federation.local import train_clients_loop, train_clients_vectorised
from gradaudit.federation.sampling import drop_clients, sample_clients
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _plans(indices, algorithm, *, batch_size, epochs=None, steps=None):
    return [
        plan_local_batches(
            c,
            idx,
            algorithm=algorithm,
            batch_size=batch_size,
            epochs=epochs,
            steps=steps,
            rng=numpy_rng(0, "local", c),
        )
        for c, idx in enumerate(indices)
    ]


@pytest.mark.parametrize(
    ("kind", "params", "algorithm", "epochs", "steps"),
    [
        ("mlp", {"hidden": [32]}, "fedsgd", None, None),
        ("mlp", {"hidden": [32, 16]}, "fedavg", 2, None),
        ("mlp", {"hidden": [16], "activation": "sigmoid"}, "fedavg", None, 5),
        ("lenet", {}, "fedavg", 1, None),
    ],
)
def test_vectorised_equals_loop(digits, kind, params, algorithm, epochs, steps) -> None:
    # Prepare: unequal client sizes so padding and inactive steps are exercised
    model = build_model(kind, params, digits.info, generator=torch_generator(0, "m"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(1)
    order = rng.permutation(len(digits.y_train))
    indices = [order[:13], order[13:40], order[40:45], order[45:90]]
    plans = _plans(indices, algorithm, batch_size=8, epochs=epochs, steps=steps)
    # Execute
    loop = train_clients_loop(
        model, state, digits.x_train, digits.y_train, plans, algorithm=algorithm, lr=0.1
    )
    vec = train_clients_vectorised(
        model, state, digits.x_train, digits.y_train, plans, algorithm=algorithm, lr=0.1
    )
    # Assert
    for a, b in zip(loop, vec, strict=True):
        assert a.keys() == b.keys() == state.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_fedavg_plan_epochs_and_steps() -> None:
    rng = np.random.default_rng(0)
    plan = plan_local_batches(
        0, np.arange(10), algorithm="fedavg", batch_size=4, epochs=2, steps=None, rng=rng
    )
    assert [len(s) for s in plan.steps] == [4, 4, 2, 4, 4, 2]
    assert plan.num_examples == 10
    plan = plan_local_batches(
        0, np.arange(10), algorithm="fedavg", batch_size=4, epochs=None, steps=5, rng=rng
    )
    assert len(plan.steps) == 5


def test_fedsgd_plan_is_one_batch_without_repeats() -> None:
    plan = plan_local_batches(
        3,
        np.arange(100, 110),
        algorithm="fedsgd",
        batch_size=4,
        epochs=None,
        steps=None,
        rng=np.random.default_rng(0),
    )
    assert len(plan.steps) == 1 and len(set(plan.steps[0].tolist())) == 4
    assert plan.num_examples == 4


def test_sampling_fixed_poisson_and_dropout() -> None:
    rng = np.random.default_rng(0)
    fixed = sample_clients(10, clients_per_round=3, sample_rate=None, rng=rng)
    assert len(fixed) == 3 and len(set(fixed.tolist())) == 3
    sizes = [
        len(sample_clients(1000, clients_per_round=None, sample_rate=0.1, rng=rng))
        for _ in range(20)
    ]
    assert 80 < np.mean(sizes) < 120
    survivors, dropped = drop_clients(np.arange(1000), dropout_rate=0.3, rng=rng)
    assert len(survivors) + len(dropped) == 1000 and 250 < len(dropped) < 350


def _run(digits, spec: FederationSpec, seed: int = 0, model_kind: str = "mlp"):
    clients = partition_dataset(
        "iid", {}, digits.y_train.numpy(), 4, rng=numpy_rng(seed, "p"), groups=None
    )
    model = build_model(
        model_kind,
        {"hidden": [32]} if model_kind == "mlp" else {"depth": 8},
        digits.info,
        generator=torch_generator(seed, "model"),
    )
    return run_federation(model, digits, clients, spec, seed=seed, capture_rounds={2})


def test_fedavg_learns_and_is_reproducible(digits) -> None:
    spec = FederationSpec(
        algorithm="fedavg", rounds=3, local={"epochs": 1, "batch_size": 16, "lr": 0.1}
    )
    first = _run(digits, spec)
    second = _run(digits, spec)
    accuracy = [r.test_accuracy for r in first.rounds]
    assert accuracy[-1] > 0.8 > first.initial_test_accuracy
    assert accuracy == [r.test_accuracy for r in second.rounds]
    for key, value in first.final_state.items():
        assert torch.equal(value, second.final_state[key])
    capture = first.captures[2]
    assert {u.client_id for u in capture.updates} == {0, 1, 2, 3}
    assert all(u.kind == "delta" for u in capture.updates)


def test_dropout_and_sampling_recorded(digits) -> None:
    spec = FederationSpec(rounds=4, clients_per_round=3, dropout_rate=0.5)
    result = _run(digits, spec)
    for record in result.rounds:
        assert len(record.sampled) == 3
        assert set(record.dropped) <= set(record.sampled)


def test_vectorised_engine_refuses_batchnorm(digits) -> None:
    from gradaudit.errors import ConfigError

    spec = FederationSpec(engine="vectorised")
    with pytest.raises(ConfigError, match="BatchNorm"):
        _run(digits, spec, model_kind="resnet")


def test_frozen_batchnorm_uses_and_keeps_global_statistics(digits) -> None:
    model = build_model("resnet", {"depth": 8}, digits.info, generator=torch_generator(0, "m"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plans = _plans([np.arange(6)], "fedsgd", batch_size=6)
    (update,) = train_clients_loop(
        model,
        state,
        digits.x_train,
        digits.y_train,
        plans,
        algorithm="fedsgd",
        lr=0.1,
        batchnorm="frozen",
    )
    buffers = {k for k in state if "running" in k or "num_batches" in k}
    assert buffers and all(not update[k].any() for k in buffers)
    # the gradient is the eval-mode gradient
    model.eval()
    idx = torch.as_tensor(plans[0].steps[0])
    loss = torch.nn.functional.cross_entropy(model(digits.x_train[idx]), digits.y_train[idx])
    expected = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), grad in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(update[name], grad)
