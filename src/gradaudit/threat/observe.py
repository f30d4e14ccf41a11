"""Build the Observation an adversary gets from a captured round, and say it in plain words."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from gradaudit.config import FederationSpec, ThreatSpec
from gradaudit.federation.aggregation import weighted_mean
from gradaudit.federation.local import LocalPlan, train_clients_loop
from gradaudit.federation.loop import Capture
from gradaudit.types import ClientUpdate, Observation, TaskInfo, Visibility

_KNOWLEDGE_WORDS = {
    "labels": "the labels of the target's examples",
    "batch_size": "the local batch size",
    "architecture": "the model architecture",
    "local_hyperparameters": "the local training hyperparameters",
    "public_data": "public labelled data from the same task that no client trains on (the "
    "dataset's held-out test split)",
}

PublicData = tuple[Tensor, Tensor]
"""Inputs in model space and their labels, disjoint from every client's training data."""


def public_side_info(public_data: PublicData, task: TaskInfo) -> dict[str, object]:
    """The ``side_info["public_data"]`` entry: copies of the inputs and labels, and their source.

    Example:
        >>> from gradaudit.types import TaskInfo
        >>> task = TaskInfo("toy", "image", (1, 2, 2), 2, None, ("a", "b"))
        >>> entry = public_side_info((torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 0])), task)
        >>> entry["x"].shape[0], entry["source"]
        (3, 'the held-out test split of toy')
    """
    x, y = public_data
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"public data: {x.shape[0]} inputs but {y.shape[0]} labels")
    return {"x": x.clone(), "y": y.clone(), "source": f"the held-out test split of {task.dataset}"}


def observe(
    threat: ThreatSpec,
    capture: Capture,
    federation: FederationSpec,
    task: TaskInfo,
    y_train: Tensor,
    *,
    visibility: Visibility = Visibility.INDIVIDUAL,
    public_data: PublicData | None = None,
) -> Observation:
    """What `threat`'s adversary sees of the captured round.

    An honest-but-curious server that aggregates in the clear sees every individual update (and
    their aggregate). Side information is added only where `threat.knows` grants it; the labels
    are the only private values that can be granted, and only for the target client.

    Args:
        threat: the threat model.
        capture: the round's traffic and private plans (the plans are used only for granted labels).
        federation: the federation settings (for the granted hyperparameters).
        task: public facts about the task.
        y_train: the training labels (read only when `labels` is granted).
        visibility: what the server's aggregation protocol lets it see.
        public_data: held-out examples no client trains on (the dataset's test split), handed
            over only when `threat.knows` grants ``public_data``; required then.
    """
    target = threat.target.client
    side: dict[str, object] = {}
    plan = capture.plans.get(target)
    if "architecture" in threat.knows:
        side["architecture"] = True
    if "batch_size" in threat.knows:
        side["batch_size"] = federation.local.batch_size
    if "labels" in threat.knows and plan is not None:
        side["labels"] = y_train[plan.used].clone()
    if "local_hyperparameters" in threat.knows:
        side["local_hyperparameters"] = {
            "algorithm": federation.algorithm,
            "lr": federation.local.lr,
            "batch_size": federation.local.batch_size,
            "epochs": federation.local.epochs,
            "steps": federation.local.steps,
            "batchnorm": federation.local.batchnorm,
            "num_steps": len(plan.steps) if plan is not None else None,
        }
    if "public_data" in threat.knows:
        if public_data is None:
            raise ValueError("the threat model grants public_data, but none was passed to observe")
        side["public_data"] = public_side_info(public_data, task)
    aggregate = capture.aggregate
    if aggregate is None and capture.updates:
        aggregate = weighted_mean(capture.updates)
    updates = capture.updates if visibility is Visibility.INDIVIDUAL else ()
    return Observation(
        round=capture.round,
        target_client=target,
        global_params=capture.global_state,
        updates=updates,
        aggregate=aggregate,
        side_info=side,
        task=task,
    )


AGGREGATE_CLIENT = -1
"""The target id of an attack on the aggregate (the sum of all included clients)."""


def aggregate_view(obs: Observation, capture: Capture, y_train: Tensor) -> Observation | None:
    """The observation that treats the round's aggregate as one client's update.

    Under secure aggregation or homomorphic encryption the server sees only the aggregate; an
    attack on one client's update then runs on the aggregate instead, as an update computed from
    every included client's examples together (for FedSGD with example weighting the weighted
    mean of the clients' gradients is exactly the gradient of their union batch). The server
    learns the summed example count from the protocol, so it is the update's ``num_examples``,
    and the granted batch size is that count. Labels, when granted, are the union's.

    Returns:
        None when the round has no aggregate or no included update.
    """
    if obs.aggregate is None or not capture.updates:
        return None
    first = capture.updates[0]
    total = sum(u.num_examples for u in capture.updates)
    withheld = frozenset.intersection(*(u.withheld for u in capture.updates))
    pseudo = ClientUpdate(
        AGGREGATE_CLIENT, capture.round, first.kind, dict(obs.aggregate), total, withheld
    )
    side = dict(obs.side_info)
    if "batch_size" in side:
        side["batch_size"] = total
    if "labels" in side:
        side["labels"] = y_train[aggregate_indices(capture)].clone()
    return Observation(
        round=obs.round,
        target_client=AGGREGATE_CLIENT,
        global_params=obs.global_params,
        updates=(pseudo,),
        aggregate=obs.aggregate,
        side_info=side,
        task=obs.task,
    )


def aggregate_indices(capture: Capture) -> Tensor:
    """PRIVATE (for scoring): the training examples behind the round's aggregate, in client
    order."""
    parts = [
        torch.as_tensor(capture.plans[u.client_id].used, dtype=torch.long)
        for u in capture.updates
        if u.client_id in capture.plans
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def describe_threat(threat: ThreatSpec) -> str:
    """The threat model in one plain sentence, for the report.

    Example:
        >>> from gradaudit.config import ThreatSpec
        >>> describe_threat(ThreatSpec(knows=("architecture",)))  # doctest: +NORMALIZE_WHITESPACE
        'An honest-but-curious server, which follows the protocol but studies what it receives,
        attacks client 0 in round 1, seeing its individual update and knowing the model
        architecture.'
    """
    who = {
        ("server", "honest_but_curious"): "An honest-but-curious server, which follows the "
        "protocol but studies what it receives,",
        ("server", "malicious"): "A malicious server, which may also change the model it sends,",
    }[(threat.adversary, threat.behaviour)]
    knows = [_KNOWLEDGE_WORDS[k] for k in threat.knows]
    if not knows:
        known = "knowing nothing beyond what it receives"
    elif len(knows) == 1:
        known = f"knowing {knows[0]}"
    else:
        known = "knowing " + ", ".join(knows[:-1]) + f" and {knows[-1]}"
    return (
        f"{who} attacks client {threat.target.client} in round {threat.target.round}, "
        f"seeing its individual update and {known}."
    )


def observe_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    task: TaskInfo,
    *,
    knows: tuple[str, ...] = ("architecture",),
    train_mode: bool = True,
    client: int = 0,
    public_data: PublicData | None = None,
) -> Observation:
    """The server's view of one FedSGD gradient that a client computes on the batch ``(x, y)``.

    A shortcut around the federation for oracle tests and benchmarks: the model's current state
    is the global model, and the client's gradient of the mean cross-entropy is its update.

    Args:
        model: the global model (left unchanged; BatchNorm buffers are restored).
        x: the client's batch in model space.
        y: its labels.
        task: public facts about the task.
        knows: side information granted (``labels``, ``batch_size``, ``architecture``).
        train_mode: compute the gradient in training mode (BatchNorm on batch statistics).
        client: the client id to report.
        public_data: examples disjoint from ``(x, y)``, granted when `knows` has ``public_data``.
    """
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train(train_mode)
    params = [p for _, p in model.named_parameters()]
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    after = model.state_dict()
    tensors = {k: after[k].detach() - state[k] for k in state}
    tensors.update(
        {n: g.detach() for (n, _), g in zip(model.named_parameters(), grads, strict=True)}
    )
    model.load_state_dict(state)
    model.train(was_training)
    update = ClientUpdate(client, 1, "gradient", tensors, int(x.shape[0]))
    hyper = {
        "algorithm": "fedsgd",
        "batch_size": int(x.shape[0]),
        "batchnorm": "train" if train_mode else "frozen",
        "num_steps": 1,
    }
    side = _granted(knows, y, int(x.shape[0]), hyper, public_data, task)
    return Observation(1, client, state, (update,), None, side, task)


def observe_fedavg(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    task: TaskInfo,
    *,
    lr: float,
    batch_size: int,
    knows: tuple[str, ...] = ("architecture",),
    batchnorm: str = "frozen",
    client: int = 0,
) -> Observation:
    """The server's view of one FedAvg client that runs one epoch over ``(x, y)`` in order.

    The counterpart of :func:`observe_batch` for model changes: the client's local batches are
    consecutive slices of `x`, trained with the federation's own loop engine, and its update is
    the model change after ``ceil(len(x) / batch_size)`` local SGD steps.
    """
    steps = tuple(
        np.arange(start, min(start + batch_size, len(x))) for start in range(0, len(x), batch_size)
    )
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    (tensors,) = train_clients_loop(
        model,
        state,
        x,
        y,
        [LocalPlan(client, steps)],
        algorithm="fedavg",
        lr=lr,
        batchnorm=batchnorm,
    )
    update = ClientUpdate(client, 1, "delta", tensors, len(x))
    hyper = {
        "algorithm": "fedavg",
        "lr": lr,
        "batch_size": batch_size,
        "epochs": 1,
        "steps": None,
        "batchnorm": batchnorm,
        "num_steps": len(steps),
    }
    side = _granted(knows, y, batch_size, hyper, None, task)
    return Observation(1, client, state, (update,), None, side, task)


def _granted(
    knows: tuple[str, ...],
    y: Tensor,
    batch_size: int,
    hyper: dict[str, object],
    public_data: PublicData | None,
    task: TaskInfo,
) -> dict[str, object]:
    """The side information `knows` grants in the shortcut observations."""
    side: dict[str, object] = {"architecture": True} if "architecture" in knows else {}
    if "labels" in knows:
        side["labels"] = y.clone()
    if "batch_size" in knows:
        side["batch_size"] = batch_size
    if "local_hyperparameters" in knows:
        side["local_hyperparameters"] = hyper
    if "public_data" in knows:
        if public_data is None:
            raise ValueError("knows grants public_data, but none was passed")
        side["public_data"] = public_side_info(public_data, task)
    return side
