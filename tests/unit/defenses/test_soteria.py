"""soteria: the scores, the pruned columns, and the defense in the round loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradaudit.config import ComponentSpec, FederationSpec
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.defenses import build_client_defenses
from gradaudit.defenses.base import DefenseContext, LocalData
from gradaudit.defenses.client.soteria import (
    pruned_features,
    representation_and_jacobian_norms,
    soteria_scores,
)
from gradaudit.errors import ConfigError
from gradaudit.federation import run_federation
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator
from gradaudit.types import ClientUpdate

CLIENTS = 3


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _hand_built() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """2 inputs -> 3 features (no activation) -> 2 classes, and a batch of two examples.

    r = W1 x + b1 with W1 rows of norm 1, 2, 5, so ||dr_i/dx|| = 1, 2, 5. For x = (1, 1) the
    features are (1.5, 1, 7), for x = (2, -1) they are (2.5, -3, 2), and the scores
    s_i = sum_n ||dr_i/dx|| / |r_ni| are (1/1.5 + 1/2.5, 2/1 + 2/3, 5/7 + 5/2) = (16/15, 8/3,
    45/14): feature 0 is the most revealing, then feature 1.
    """
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]))
        net[0].bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
        net[1].weight.copy_(torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.5, -0.6]]))
        net[1].bias.zero_()
    return net, torch.tensor([[1.0, 1.0], [2.0, -1.0]]), torch.tensor([0, 1])


def _defense(net: nn.Module, task, params: dict):
    fed = FederationSpec()
    context = DefenseContext(net, fed, (2,), task, 0)
    specs = [ComponentSpec(kind="soteria", params=params)]
    (defense,) = build_client_defenses(specs, context).defenses
    return defense


def _gradient_update(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> ClientUpdate:
    loss = nn.functional.cross_entropy(net(x), y)
    names = [n for n, _ in net.named_parameters()]
    grads = torch.autograd.grad(loss, list(net.parameters()))
    return ClientUpdate(0, 1, "gradient", dict(zip(names, grads, strict=True)), int(x.shape[0]))


def test_scores_by_hand(digits) -> None:
    # Prepare
    net, x, _ = _hand_built()
    # Execute
    r, norms = representation_and_jacobian_norms(net, net[1], x)
    scores = soteria_scores(r, norms)
    # Check
    torch.testing.assert_close(r, torch.tensor([[1.5, 1.0, 7.0], [2.5, -3.0, 2.0]]))
    torch.testing.assert_close(norms, torch.tensor([[1.0, 2.0, 5.0], [1.0, 2.0, 5.0]]))
    expected = torch.tensor([16 / 15, 8 / 3, 45 / 14], dtype=torch.float64)
    torch.testing.assert_close(scores, expected)
    assert pruned_features(scores, 1 / 3).tolist() == [0]
    assert pruned_features(scores, 2 / 3).tolist() == [0, 1]


@pytest.mark.parametrize(("rate", "pruned"), [(1 / 3, [0]), (2 / 3, [0, 1]), (1.0, [0, 1, 2])])
def test_pruned_columns_are_the_lowest_scores(digits, rate, pruned) -> None:
    # Prepare
    net, x, y = _hand_built()
    update = _gradient_update(net, x, y)
    before = {k: v.clone() for k, v in update.tensors.items()}
    defense = _defense(net, digits.info, {"pruning_rate": rate})
    local = LocalData(net, {k: v.clone() for k, v in net.state_dict().items()}, x, y)
    # Execute
    sent = defense.transform(update, rng=torch.Generator(), local=local)
    # Check: exactly the expected columns of the head's weight are zero; nothing else changed
    kept = [c for c in range(3) if c not in pruned]
    assert float(sent.tensors["1.weight"][:, pruned].abs().sum()) == 0.0
    torch.testing.assert_close(sent.tensors["1.weight"][:, kept], before["1.weight"][:, kept])
    for key in ("0.weight", "0.bias", "1.bias"):
        assert torch.equal(sent.tensors[key], before[key])
    assert all(torch.equal(update.tensors[k], before[k]) for k in before)  # input untouched


def test_zero_rate_leaves_the_update_unchanged(digits) -> None:
    net, x, y = _hand_built()
    update = _gradient_update(net, x, y)
    defense = _defense(net, digits.info, {"pruning_rate": 0.0})
    local = LocalData(net, net.state_dict(), x, y)
    sent = defense.transform(update, rng=torch.Generator(), local=local)
    assert all(torch.equal(sent.tensors[k], update.tensors[k]) for k in update.tensors)


def test_exact_norms_match_the_jacobian_and_the_estimate_is_close(digits) -> None:
    # Prepare: LeNet's head input (12 channels x 2 x 2 = 48 features)
    net = build_model("lenet", {}, digits.info, generator=torch_generator(0, "m"))
    x = digits.x_train[:4]
    head = net.head
    net.eval()

    def features(one: torch.Tensor) -> torch.Tensor:
        seen = []
        handle = head.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
        net(one[None])
        handle.remove()
        return seen[0][0]

    oracle = torch.stack(
        [
            torch.autograd.functional.jacobian(features, x[i]).flatten(1).norm(dim=1)
            for i in range(4)
        ]
    )
    net.train()
    # Execute
    _, exact = representation_and_jacobian_norms(net, head, x)
    _, estimate = representation_and_jacobian_norms(
        net, head, x, probes=256, generator=torch_generator(0, "probes")
    )
    # Check: exact to float precision; the estimate within its ~1/sqrt(256) relative error
    torch.testing.assert_close(exact, oracle, rtol=1e-4, atol=1e-7)
    assert float(((estimate - oracle).abs() / oracle).median()) < 0.1
    assert net.training  # mode restored


def test_build_refuses_a_layer_that_is_not_linear(digits) -> None:
    net = build_model("lenet", {}, digits.info, generator=torch_generator(0, "m"))
    with pytest.raises(ConfigError, match=r"not an nn\.Linear"):
        _defense(net, digits.info, {"layer": "body.0"})
    with pytest.raises(ConfigError, match="no module"):
        _defense(net, digits.info, {"layer": "nowhere"})


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_soteria_in_the_round_loop_prunes_the_head_only(digits, algorithm) -> None:
    # Prepare: the same federation with and without the defense
    local = {"batch_size": 8, "steps": 2} if algorithm == "fedavg" else {"batch_size": 8}
    fed = FederationSpec(algorithm=algorithm, local=local)
    parts = partition_dataset(
        "iid", {}, digits.y_train.numpy(), CLIENTS, rng=numpy_rng(0, "partition"), groups=None
    )

    def run(defended: bool):
        net = build_model("mlp", {"hidden": [40]}, digits.info, generator=torch_generator(0, "m"))
        context = DefenseContext(net, fed, tuple(map(len, parts)), digits.info, 0)
        specs = [ComponentSpec(kind="soteria", params={})] if defended else []
        stack = build_client_defenses(specs, context)
        return run_federation(net, digits, parts, fed, seed=0, capture_rounds={1}, defenses=stack)

    # Execute
    defended, plain = run(True), run(False)
    # Check: 80 % of the 40 head columns zero (estimated norms: 40 features > 16 probes)
    for sent, whole in zip(defended.captures[1].updates, plain.captures[1].updates, strict=True):
        zero = (sent.tensors["head.weight"] == 0).all(dim=0)
        assert int(zero.sum()) == 32
        torch.testing.assert_close(
            sent.tensors["head.weight"][:, ~zero], whole.tensors["head.weight"][:, ~zero]
        )
        for key in ("body.0.weight", "body.0.bias", "head.bias"):
            torch.testing.assert_close(sent.tensors[key], whole.tensors[key])
