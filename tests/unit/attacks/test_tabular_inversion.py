"""tabular_inversion (TabLeak): exact on a 2-feature toy, the relaxation pieces, the fast matching
equal to the reference one, labels, FedAvg, budgets, refusals, and real Adult rows."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradaudit.attacks import ATTACKS, build_attack
from gradaudit.attacks.inversion.tabular import (
    Pooled,
    Relaxation,
    TabularInversionAttack,
    TabularInversionParams,
    cosine_matching,
    feature_certainty,
    feature_entropy,
    gram_matching,
    pool_restarts,
    project,
    relaxed_inputs,
    relaxed_rows,
)
from gradaudit.data import load_dataset
from gradaudit.metrics.tabular import TABLEAK_TOLERANCE, score_rows
from gradaudit.models import build_model
from gradaudit.models.tabular import TabularMLP
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch, observe_fedavg
from gradaudit.types import Observation, TabularSchema, TaskInfo

TOY = TabularSchema(
    ("dose",), ("ward",), (4,), (("a", "b", "c", "d"),), numeric_mean=(10.0,), numeric_std=(2.0,)
)
TOY_TASK = TaskInfo("toy", "tabular", (2,), 2, None, ("n", "y"), tabular=TOY)
MIXED = TabularSchema(("a", "b"), ("c", "d"), (3, 4))
MIXED_TASK = TaskInfo("mixed", "tabular", (4,), 3, None, ("x", "y", "z"), tabular=MIXED)
QUICK = {"restarts": 4, "iterations": 200, "consistency": "off"}


def _model(task: TaskInfo, encoding: str, seed: int = 0, **params: object) -> TabularMLP:
    params = {"hidden": [16], "encoding": encoding, "embedding_dim": 3, **params}
    model = build_model("tabular_mlp", params, task, generator=torch.Generator().manual_seed(seed))
    assert isinstance(model, TabularMLP)
    return model


def _run(obs: Observation, model: nn.Module, **params: object):
    attack = TabularInversionAttack(TabularInversionParams(**params))  # type: ignore[arg-type]
    return attack.run(obs, model, rng=torch.Generator().manual_seed(0))


def _toy_row(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    dose = float(torch.randn(1, generator=g).clamp(-2, 2))
    return torch.tensor([[dose, float(torch.randint(4, (1,), generator=g))]])


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("encoding", ["onehot", "embedding"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tableak_is_exact_on_a_two_feature_toy(encoding: str, seed: int) -> None:
    model = _model(TOY_TASK, encoding, seed)
    x = _toy_row(seed)
    obs = observe_batch(model, x, torch.tensor([seed % 2]), TOY_TASK)
    # every code allowed: the category must come from the gradient matching itself
    result = _run(obs, model, restrict_support=False, **QUICK)
    assert result.status == "ok"
    rows = result.reconstruction.rows
    assert rows.shape == (1, 2)
    assert rows[0, 1] == x[0, 1]  # the category, exactly
    assert abs(float(rows[0, 0] - x[0, 0])) <= TABLEAK_TOLERANCE  # the numeric value
    assert result.details["labels"] == "recovered (idlg)"
    assert result.reconstruction.labels.tolist() == [seed % 2]
    assert result.reconstruction.kept is None
    assert 0.9 < float(result.reconstruction.confidence[0]) <= 1.0


def test_fedavg_change_of_one_example_is_inverted_too() -> None:
    model = _model(TOY_TASK, "onehot")
    x = _toy_row(3)
    obs = observe_fedavg(
        model,
        x,
        torch.tensor([1]),
        TOY_TASK,
        lr=0.1,
        batch_size=1,
        knows=("architecture", "labels"),
    )
    result = _run(obs, model, restrict_support=False, **QUICK)
    assert result.details["gradient"].startswith("the negated FedAvg model change")
    assert result.details["labels"] == "granted by the threat model"
    assert result.reconstruction.rows[0, 1] == x[0, 1]
    assert abs(float(result.reconstruction.rows[0, 0] - x[0, 0])) <= TABLEAK_TOLERANCE


# --------------------------------------------------------------------------- the relaxation


def test_relaxed_inputs_respect_bounds_temperature_and_support() -> None:
    support = (torch.tensor([True, False, True]),)
    relax = Relaxation(torch.tensor([-2.0]), torch.tensor([6.0]), (3,), 0.5, support)
    z = torch.tensor([[[0.0, 1.0, 9.0, 0.0], [50.0, 0.0, 0.0, 0.0]]])
    numeric, probs = relaxed_inputs(z, relax)
    assert numeric.flatten().tolist() == pytest.approx([2.0, 6.0])
    expected = [math.exp(2.0) / (math.exp(2.0) + 1.0), 0.0, 1.0 / (math.exp(2.0) + 1.0)]
    assert probs[0][0, 0].tolist() == pytest.approx(expected)
    assert probs[0][0, 1].tolist() == pytest.approx([0.5, 0.0, 0.5])
    assert project(probs)[0][0].tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    assert relaxed_rows(numeric[0], [p[0] for p in probs]).tolist() == [[2.0, 0.0], [6.0, 0.0]]


def test_pooling_matches_restarts_then_takes_medians() -> None:
    rows = torch.tensor([[0.0, 1.0, 0.0], [3.0, 0.0, 1.0]])  # numeric, then codes (2, 2)
    numeric = torch.stack([rows[:, :1] + d for d in (0.0, 0.1, -0.1, 0.2)])
    probs = [
        torch.nn.functional.one_hot(rows[:, 1 + j].long(), 2).float().expand(4, 2, 2).clone()
        for j in range(2)
    ]
    for r in (1, 3):  # two restarts list their rows the other way round
        numeric[r] = numeric[r].flip(0)
        for p in probs:
            p[r] = p[r].flip(0)
    schema = TabularSchema(("v",), ("s", "t"), (2, 2))
    pooled = pool_restarts(numeric, probs, 0, schema)
    assert torch.equal(pooled.rows()[:, 1:], rows[:, 1:])
    assert pooled.numeric[:, 0].tolist() == pytest.approx([0.0, 3.0])  # median of 0, .1, -.1, .2
    spread = float(torch.tensor([0.0, 0.1, -0.1, 0.2]).std())
    assert pooled.numeric_std[:, 0].tolist() == pytest.approx([spread, spread])


def test_entropy_and_certainty_of_a_pooled_reconstruction() -> None:
    pooled = Pooled(
        numeric=torch.zeros(2, 1),
        probs=[torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])],
        numeric_std=torch.tensor([[0.5], [2.0]]),
    )
    entropy = feature_entropy(pooled)
    gaussian = [0.5 + 0.5 * math.log(2 * math.pi * s**2) for s in (0.5, 2.0)]
    assert entropy[:, 0].tolist() == pytest.approx(gaussian)
    assert entropy[:, 1].tolist() == pytest.approx([0.0, 1.0], abs=1e-9)
    certainty = feature_certainty(pooled).flatten().tolist()
    assert certainty == pytest.approx([0.5, 1.0, 0.0, 0.0], abs=1e-9)


@pytest.mark.parametrize("encoding", ["embedding", "onehot"])
@pytest.mark.parametrize("rows", [1, 6])  # Gram matrices for one row, full gradients for six
def test_fast_matching_equals_the_reference(encoding: str, rows: int) -> None:
    model = _model(MIXED_TASK, encoding, hidden=[5, 4]).double()
    g = torch.Generator().manual_seed(rows)
    x = torch.cat(
        [
            torch.randn(rows, 2, generator=g),
            torch.randint(3, (rows, 1), generator=g).float(),
            torch.randint(4, (rows, 1), generator=g).float(),
        ],
        dim=1,
    ).double()
    y = torch.randint(3, (rows,), generator=g)
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    target = {name: t for (name, _), t in zip(model.named_parameters(), grads, strict=True)}
    del target["head.bias"]  # a tensor the client did not send takes no part
    relax = Relaxation(torch.full((2,), -3.0).double(), torch.full((2,), 3.0).double(), (3, 4))
    z = torch.randn(3, rows, relax.width, generator=g, dtype=torch.float64, requires_grad=True)
    for hard in (False, True):
        reference = cosine_matching(model, target, y, relax, hard=hard)(z)
        fast = gram_matching(model, target, y, relax, hard=hard)(z)
        assert torch.allclose(fast, reference, atol=1e-10)
        (dz_ref,) = torch.autograd.grad(reference.sum(), [z])
        (dz_fast,) = torch.autograd.grad(fast.sum(), [z])
        assert torch.allclose(dz_fast, dz_ref, atol=1e-10)


# --------------------------------------------------------------------------- the attack


def test_support_budget_pooling_and_consistency_details() -> None:
    model = _model(TOY_TASK, "onehot")
    x = torch.tensor([[0.5, 2.0], [-1.0, 2.0], [1.5, 0.0]])
    obs = observe_batch(model, x, torch.tensor([0, 1, 1]), TOY_TASK, knows=("architecture",))
    result = _run(obs, model, restarts=3, iterations=100_000, max_seconds=0.2, pooling="best")
    assert result.status == "ok"
    assert result.details["iterations_run"] < 100_000  # the budget stopped it
    assert "restricted to the codes present" in result.details["support"]
    assert set(result.reconstruction.rows[:, 1].tolist()) <= {0.0, 2.0}
    assert result.details["labels"] == "recovered (bias)"
    assert result.reconstruction.kept is not None  # consistency=repair by default
    assert result.reconstruction.kept.shape == (3,)
    assert result.details["consistency"]["mode"] == "repair"
    assert set(result.details["feature_entropy"]) == {"dose", "ward"}
    assert result.trace and result.trace[-1][0] == result.details["iterations_run"]


def test_not_applicable_where_it_cannot_run() -> None:
    model = _model(TOY_TASK, "onehot")
    obs = observe_batch(model, _toy_row(0), torch.tensor([0]), TOY_TASK)
    too_many = TabularInversionAttack(TabularInversionParams(max_rows=1))
    big = observe_batch(
        model, torch.cat([_toy_row(1), _toy_row(2)]), torch.tensor([0, 1]), TOY_TASK
    )
    assert "max_rows=1" in str(too_many.applicable(big))
    plain = build_model(
        "mlp", {"hidden": [4]}, TOY_TASK, generator=torch.Generator().manual_seed(0)
    )
    assert _run(obs, plain).status == "not_applicable"
    image = TaskInfo("img", "image", (1, 2, 2), 2, None, ("a", "b"))
    assert "tabular" in str(_run(dataclasses.replace(obs, task=image), model).reason)
    private_head = dataclasses.replace(
        obs.updates[0], withheld=frozenset({"head.weight", "head.bias"})
    )
    result = _run(dataclasses.replace(obs, updates=(private_head,)), model)
    assert result.status == "not_applicable" and "labels are not granted" in str(result.reason)


def test_registered_with_tableaks_defaults() -> None:
    assert "tabular_inversion" in ATTACKS.names()
    attack = build_attack("tabular_inversion", {})
    assert isinstance(attack, TabularInversionAttack)
    p = attack.params
    assert (p.iterations, p.restarts, p.lr, p.temperature, p.signed) == (1500, 30, 0.06, 1.0, True)


@pytest.mark.data
def test_real_adult_rows_at_batch_8_are_leaked(shared_data_dir: Path) -> None:
    data = load_dataset("adult", shared_data_dir)
    params = {"hidden": [100, 100], "encoding": "onehot"}
    model = build_model("tabular_mlp", params, data.info, generator=torch_generator(0, "model"))
    idx = torch.as_tensor(np.random.default_rng(0).choice(len(data.y_train), 8, replace=False))
    obs = observe_batch(
        model, data.x_train[idx], data.y_train[idx], data.info, knows=("architecture", "labels")
    )
    result = _run(obs, model, restarts=8, iterations=300)
    metrics, _ = score_rows(
        result.reconstruction.rows,
        data.x_train[idx],
        data.info.tabular,
        kept=result.reconstruction.kept,
        reference=data.x_test,
    )
    assert metrics["feature_accuracy"] >= 0.85
    assert metrics["feature_accuracy"] >= metrics["feature_accuracy_random"] + 0.25
