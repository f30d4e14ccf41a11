"""federated_dropout and private_head: sub-models, private layers, and attacks that respect them."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from gradaudit.attacks import build_attack
from gradaudit.attacks.base import HEAD_WITHHELD, gradient_estimate, sent_positions
from gradaudit.attacks.inversion.image import gradient_target
from gradaudit.attacks.inversion.simulate import LocalReplay
from gradaudit.config import ComponentSpec, FederationSpec, ThreatSpec
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.defenses import build_client_defenses
from gradaudit.defenses.base import DefenseContext, LocalData
from gradaudit.defenses.client.partition import droppable_layers, private_keys
from gradaudit.errors import ConfigError
from gradaudit.federation import run_federation
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator
from gradaudit.threat import observe, observe_batch
from gradaudit.types import ClientUpdate, Observation

CLIENTS = 4


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _net(digits, kind: str = "mlp", params: dict | None = None):
    params = {"hidden": [16, 8]} if params is None else params
    return build_model(kind, params, digits.info, generator=torch_generator(0, "model"))


def _parts(digits):
    return partition_dataset(
        "iid", {}, digits.y_train.numpy(), CLIENTS, rng=numpy_rng(0, "partition"), groups=None
    )


def _context(digits, net, fed: FederationSpec) -> DefenseContext:
    sizes = tuple(len(p) for p in _parts(digits))
    return DefenseContext(net, fed, sizes, digits.info, 0)


def _stack(digits, net, fed: FederationSpec, kind: str, params: dict | None = None):
    spec = ComponentSpec(kind=kind, params=params or {})
    return build_client_defenses([spec], _context(digits, net, fed))


def _federate(digits, net, fed: FederationSpec, stack, rounds=(1,)):
    return run_federation(
        net, digits, _parts(digits), fed, seed=0, capture_rounds=set(rounds), defenses=stack
    )


def _full_update(net, client: int = 0, rnd: int = 1) -> ClientUpdate:
    tensors = {k: torch.ones_like(v) for k, v in net.state_dict().items()}
    return ClientUpdate(client, rnd, "gradient", tensors, 8)


# --------------------------------------------------------------------------- federated dropout


def test_droppable_layers_follow_the_units_to_the_next_layer(digits) -> None:
    # Execute
    mlp, _ = droppable_layers(_net(digits), digits.info)
    lenet, _ = droppable_layers(_net(digits, "lenet", {}), digits.info)
    resnet, whole = droppable_layers(_net(digits, "resnet", {"depth": 8, "width": 4}), digits.info)
    # Check: hidden layers only, each with its activation as exit and its consumer's columns
    assert [(la.name, la.exit, la.units) for la in mlp] == [
        ("body.0", "body.1", 16),
        ("body.2", "body.3", 8),
    ]
    assert [(s.key, s.dim, s.width) for s in mlp[1].slices] == [
        ("body.2.weight", 0, 1),
        ("body.2.bias", 0, 1),
        ("head.weight", 1, 1),
    ]
    assert [la.name for la in lenet] == ["body.0", "body.2", "body.4"]
    assert lenet[-1].slices[-1].width == 4  # 12 channels of 2x2 flattened into the head
    # Check: in a ResNet only the stem (conv, BatchNorm, ReLU) can be dropped exactly
    assert [(la.name, la.exit) for la in resnet] == [("stem.0", "stem.2")]
    assert {s.key for s in resnet[0].slices} >= {"stem.1.running_mean", "stem.1.bias"}
    assert "stages.0.conv1" in whole


def test_sub_model_masks_are_seeded_by_round_and_client(digits) -> None:
    # Prepare
    net = _net(digits)
    fed = FederationSpec()
    stack = _stack(digits, net, fed, "federated_dropout", {"fraction": 0.5})
    (defense,) = stack.defenses
    # Execute
    first, again = defense.masks(1, 2), defense.masks(1, 2)
    other_client, other_round = defense.masks(2, 2), defense.masks(1, 3)
    # Check: reproducible, different per client and per round, exactly half the units kept
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other_client[k]) for k in first)
    assert any(not torch.equal(first[k], other_round[k]) for k in first)
    assert [int(m.sum()) for m in first.values()] == [8, 4]
    assert stack.needs_loop_engine


def test_dropped_units_neither_act_nor_learn(digits) -> None:
    # Prepare: client 0's sub-model, and a copy whose dropped units carry other weights
    net = _net(digits)
    (defense,) = _stack(digits, net, FederationSpec(), "federated_dropout").defenses
    dropped = ~defense.masks(0, 1)["body.0"]
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.body[0].weight[dropped] = 5.0
        other.body[0].bias[dropped] = -5.0
    x, y = digits.x_train[:8], digits.y_train[:8]
    plain = net(x)
    rule = defense.local_training(0, 1)
    # Execute
    with rule.context(net), rule.context(other):
        out, out_other = net(x), other(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        names = [n for n, _ in net.named_parameters()]
        grads = dict(zip(names, torch.autograd.grad(loss, list(net.parameters())), strict=True))
    # Check: the dropped units change nothing downstream and get no gradient
    torch.testing.assert_close(out, out_other)
    assert float(grads["body.0.weight"][dropped].abs().sum()) == 0.0
    assert float(grads["body.0.bias"][dropped].abs().sum()) == 0.0
    assert float(grads["body.2.weight"][:, dropped].abs().sum()) == 0.0
    assert float(grads["body.0.weight"][~dropped].abs().sum()) > 0.0
    # Check: the hooks are gone after the context
    torch.testing.assert_close(net(x), plain)


def test_transform_zeroes_dropped_entries_and_counts_the_sub_model(digits) -> None:
    # Prepare: a dense update of ones through 64 -> 16 -> 8 -> 10
    net = _net(digits)
    stack = _stack(digits, net, FederationSpec(), "federated_dropout", {"fraction": 0.5})
    (defense,) = stack.defenses
    update = _full_update(net, client=2, rnd=5)
    masks = defense.masks(2, 5)
    keep0, keep1 = masks["body.0"], masks["body.2"]
    local = LocalData(net, net.state_dict(), digits.x_train[:0], digits.y_train[:0])
    # Execute
    sent = defense.transform(update, rng=torch.Generator(), local=local)
    # Check: dropped rows, biases and next-layer columns are zero, the rest untouched
    t = sent.tensors
    assert torch.equal(t["body.0.weight"][~keep0], torch.zeros(8, 64))
    assert torch.equal(t["body.0.weight"][keep0], torch.ones(8, 64))
    assert torch.equal(t["body.2.weight"], keep1[:, None] & keep0[None, :])
    assert torch.equal(t["head.weight"], keep1[None, :].expand(10, 8).float())
    assert torch.equal(t["head.bias"], torch.ones(10))
    assert all(float(v.min()) == 1.0 for v in update.tensors.values())  # input untouched
    # Check: bytes of the sub-model only, 8 * 64 + 8 + 4 * 8 + 4 + 10 * 4 + 10 floats
    assert sent.size_bytes == 4 * (8 * 64 + 8 + 4 * 8 + 4 + 10 * 4 + 10)
    assert sent.withheld == frozenset()


@pytest.mark.parametrize(
    ("kind", "params", "algorithm"),
    [
        ("mlp", {"hidden": [16, 8]}, "fedsgd"),
        ("resnet", {"depth": 8, "width": 4}, "fedavg"),  # BatchNorm in the stem
    ],
)
def test_federated_dropout_in_the_round_loop(digits, kind, params, algorithm) -> None:
    # Prepare
    net = _net(digits, kind, params)
    fed = FederationSpec(algorithm=algorithm, local={"batch_size": 8, "steps": 2})
    if algorithm == "fedsgd":
        fed = FederationSpec(local={"batch_size": 8})
    stack = _stack(digits, net, fed, "federated_dropout", {"fraction": 0.5})
    (defense,) = stack.defenses
    full = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    # Execute
    result = _federate(digits, net, fed, stack)
    baseline = _federate(digits, _net(digits, kind, params), fed, None)
    # Check: the loop engine ran; each update is zero exactly at its dropped units' entries
    assert result.engine == "loop"
    for update, whole in zip(result.captures[1].updates, baseline.captures[1].updates, strict=True):
        masks = defense.masks(update.client_id, 1)
        for layer in defense.layers:
            dropped = ~masks[layer.name]
            rows = update.tensors[f"{layer.name}.weight"]
            assert float(rows[dropped].abs().sum()) == 0.0
            assert float(rows[~dropped].abs().sum()) > 0.0
            # the kept units trained inside the sub-model, not the whole model
            assert not torch.allclose(
                rows[~dropped], whole.tensors[f"{layer.name}.weight"][~dropped]
            )
            for piece in layer.slices:
                along = dropped.repeat_interleave(piece.width)
                block = update.tensors[piece.key].transpose(0, piece.dim)[along]
                assert float(block.abs().sum()) == 0.0, piece.key
        assert update.size_bytes < full
    assert 0.0 < result.rounds[0].test_accuracy <= 1.0


def test_federated_dropout_refuses_a_model_without_hidden_layers(digits) -> None:
    net = _net(digits, "mlp", {"hidden": []})
    with pytest.raises(ConfigError, match="no hidden layer"):
        _stack(digits, net, FederationSpec(), "federated_dropout")


# --------------------------------------------------------------------------- private head


def test_private_keys_default_to_the_classifier_head(digits) -> None:
    # Prepare / Execute
    net = _net(digits)
    stack = _stack(digits, net, FederationSpec(), "private_head")
    (defense,) = stack.defenses
    # Check
    assert defense.keys == ("head.weight", "head.bias")
    assert stack.needs_loop_engine
    assert private_keys(net.state_dict(), ("body.2", "head.bias")) == (
        "body.2.weight",
        "body.2.bias",
        "head.bias",
    )
    with pytest.raises(ConfigError, match="matches no key"):
        _stack(digits, net, FederationSpec(), "private_head", {"layers": ["nothing"]})
    with pytest.raises(ConfigError, match="nothing would be shared"):
        _stack(digits, net, FederationSpec(), "private_head", {"layers": ["body", "head"]})


def test_transform_withholds_zeroed_head_and_steps_it_locally_in_fedsgd(digits) -> None:
    # Prepare: a FedSGD gradient of ones; the client's head is the initial one
    net = _net(digits)
    stack = _stack(digits, net, FederationSpec(local={"lr": 0.5}), "private_head")
    (defense,) = stack.defenses
    state = {k: v.clone() for k, v in net.state_dict().items()}
    update = _full_update(net, client=1)
    local = LocalData(net, state, digits.x_train[:0], digits.y_train[:0])
    # Execute
    sent = defense.transform(update, rng=torch.Generator(), local=local)
    # Check: head zero and withheld, body untouched, input untouched, bytes without the head
    assert sent.withheld == frozenset({"head.weight", "head.bias"})
    assert float(sent.tensors["head.weight"].abs().sum()) == 0.0
    assert torch.equal(sent.tensors["body.0.weight"], update.tensors["body.0.weight"])
    assert float(update.tensors["head.weight"].min()) == 1.0
    assert sent.size_bytes == 4 * sum(
        v.numel() for k, v in update.tensors.items() if not k.startswith("head")
    )
    # Check: the client applied its head gradient itself (lr 0.5)
    torch.testing.assert_close(defense.heads[1]["head.weight"], state["head.weight"] - 0.5)
    obs = Observation(1, 1, state, (sent,), None, {}, digits.info)
    assert sent_positions(net, gradient_estimate(sent, obs)[0]) == (0, 1, 2, 3)


def test_training_context_loads_and_keeps_each_clients_head(digits) -> None:
    # Prepare
    net = _net(digits)
    stack = _stack(digits, net, FederationSpec(algorithm="fedavg"), "private_head")
    (defense,) = stack.defenses
    initial = net.state_dict()["head.weight"].clone()
    # Execute: client 0 "trains" its head; then client 1 starts; then client 0 again
    with defense.local_training(0, 1).context(net), torch.no_grad():
        net.head.weight.add_(1.0)
    net.load_state_dict({**net.state_dict(), "head.weight": initial})  # the global head
    with defense.local_training(1, 1).context(net):
        seen_by_1 = net.head.weight.detach().clone()
    with defense.local_training(0, 2).context(net):
        seen_by_0 = net.head.weight.detach().clone()
    # Check
    torch.testing.assert_close(seen_by_1, initial)
    torch.testing.assert_close(seen_by_0, initial + 1.0)
    states = defense.evaluation_states(net.state_dict())
    assert len(states) == 2
    torch.testing.assert_close(states[0]["head.weight"], initial + 1.0)


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_private_head_in_the_round_loop(digits, algorithm) -> None:
    # Prepare
    net = _net(digits)
    local = {"batch_size": 8, "epochs": 1} if algorithm == "fedavg" else {"batch_size": 8}
    fed = FederationSpec(algorithm=algorithm, rounds=2, local=local)
    stack = _stack(digits, net, fed, "private_head")
    (defense,) = stack.defenses
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    # Execute
    result = _federate(digits, net, fed, stack, rounds=(2,))
    # Check: the captured head is withheld and zero; the global head never moved
    for update in result.captures[2].updates:
        assert update.withheld == frozenset({"head.weight", "head.bias"})
        assert float(update.tensors["head.weight"].abs().sum()) == 0.0
        assert float(update.tensors["body.0.weight"].abs().sum()) > 0.0
    assert result.engine == "loop"
    torch.testing.assert_close(result.final_state["head.weight"], initial["head.weight"])
    assert not torch.equal(result.final_state["body.0.weight"], initial["body.0.weight"])
    # Check: every client trained its own head, and the heads differ
    heads = [defense.heads[c]["head.weight"] for c in range(CLIENTS)]
    assert all(not torch.equal(h, initial["head.weight"]) for h in heads)
    assert not torch.equal(heads[0], heads[1])
    assert len(defense.evaluation_states(result.final_state)) == CLIENTS


def _private_head_observation(digits, knows: tuple[str, ...]):
    net = _net(digits)
    fed = FederationSpec(local={"batch_size": 2})
    stack = _stack(digits, net, fed, "private_head")
    result = _federate(digits, net, fed, stack)
    threat = ThreatSpec(knows=knows, target={"round": 1, "client": 0})
    return net, observe(threat, result.captures[1], fed, digits.info, digits.y_train)


def test_label_recovery_is_not_applicable_on_a_private_head(digits) -> None:
    # Prepare
    net, obs = _private_head_observation(digits, ("architecture",))
    # Execute
    labels = build_attack("label_recovery", {}).run(obs, net, rng=torch_generator(0, "a"))
    inversion = build_attack("inverting_gradients", {"iterations": 2}).run(
        obs, net, rng=torch_generator(0, "a")
    )
    # Check: the head's gradient is what these attacks need for labels
    assert labels.status == "not_applicable" and labels.reason == HEAD_WITHHELD
    assert build_attack("label_recovery", {}).applicable(obs, net) == HEAD_WITHHELD
    assert inversion.status == "not_applicable" and HEAD_WITHHELD in str(inversion.reason)


def test_gradient_matching_uses_the_body_only(digits) -> None:
    # Prepare: the same observation with garbage in the withheld head tensors
    net, obs = _private_head_observation(digits, ("architecture", "labels"))
    update = obs.update_of(0)
    garbage = {**update.tensors, "head.weight": torch.randn(update.tensors["head.weight"].shape)}
    obs_garbage = replace(obs, updates=(replace(update, tensors=garbage),))
    attack = build_attack("inverting_gradients", {"iterations": 3, "center_samples": 1})
    # Execute
    clean = attack.run(obs, net, rng=torch_generator(0, "a"))
    dirty = attack.run(obs_garbage, net, rng=torch_generator(0, "a"))
    grads, _ = gradient_estimate(update, obs)
    match = gradient_target(
        obs,
        net,
        grads,
        obs.side_info["labels"],
        LocalReplay(unrolled=False),
        train_mode=True,
        center_samples=0,
        rng=torch_generator(0, "b"),
    )
    # Check: the attack ran, compared the four body tensors, and never read the head
    assert clean.status == "ok", clean.reason
    assert "head.weight" not in grads
    assert match.keep == (0, 1, 2, 3) and len(match.target) == 4
    torch.testing.assert_close(clean.reconstruction.images, dirty.reconstruction.images)
    assert clean.details["objective"] == dirty.details["objective"]


def test_analytic_needs_only_the_first_layer(digits) -> None:
    # Prepare: one example; the MLP's first layer is sent, a private copy of it is not
    net = _net(digits)
    obs = observe_batch(net, digits.x_train[:1], digits.y_train[:1], digits.info)
    update = obs.update_of(0)
    (defense,) = _stack(digits, net, FederationSpec(), "private_head").defenses
    local = LocalData(net, obs.global_params, digits.x_train[:0], digits.y_train[:0])
    head_private = defense.transform(update, rng=torch.Generator(), local=local)
    first_private = replace(update, withheld=frozenset({"body.0.weight"}))
    attack = build_attack("analytic", {})
    # Execute
    head_result = attack.run(replace(obs, updates=(head_private,)), net, rng=torch.Generator())
    first_result = attack.run(replace(obs, updates=(first_private,)), net, rng=torch.Generator())
    # Check: a private head does not stop exact recovery from the first layer
    assert head_result.status == "ok"
    assert first_result.status == "not_applicable"
    assert "first layer (body.0)" in str(first_result.reason)
