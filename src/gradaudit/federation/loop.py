"""The round loop: sample clients, train them, apply client defenses, aggregate, evaluate."""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from gradaudit.config import FederationSpec
from gradaudit.data.base import Dataset
from gradaudit.defenses.base import DefenseStack, LocalData, RoundInfo
from gradaudit.defenses.server.base import (
    AggregationAbortedError,
    AggregationProtocol,
    Contribution,
    SecureSum,
    StageCost,
    SumLayout,
)
from gradaudit.defenses.server.network import Network
from gradaudit.errors import ConfigError
from gradaudit.federation.aggregation import apply_aggregate, weighted_mean
from gradaudit.federation.local import (
    LocalPlan,
    has_batchnorm,
    plan_local_batches,
    train_clients_loop,
    train_clients_vectorised,
)
from gradaudit.federation.sampling import drop_clients, sample_clients
from gradaudit.seeding import numpy_rng, torch_generator
from gradaudit.types import ClientUpdate, TensorDict, tensor_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round.

    Attributes:
        round: the round (from 1).
        sampled: the clients asked to train.
        dropped: the sampled clients whose update never arrived.
        test_accuracy: the new global model's accuracy on the test set.
        test_loss: its mean cross-entropy on the test set.
        declined: sampled clients a defense kept out (a participation budget spent).
        lost: clients that trained but whose update did not make it into the aggregate (the
            network dropped them, or they dropped during the aggregation protocol).
        recovered: clients that dropped after sending a masked input, counted anyway.
        aborted: why the aggregation protocol aborted the round (the model is unchanged).
    """

    round: int
    sampled: tuple[int, ...]
    dropped: tuple[int, ...]
    test_accuracy: float
    test_loss: float
    declined: tuple[int, ...] = ()
    lost: tuple[int, ...] = ()
    recovered: tuple[int, ...] = ()
    aborted: str | None = None


@dataclass(frozen=True)
class Capture:
    """What crossed the network in one round, and the private truth used only for scoring.

    Attributes:
        round: the round.
        global_state: the model the server sent at the start of the round.
        updates: every update that reached the server (after client-side defenses).
        plans: PRIVATE: which examples each client used. Attacks never see this.
        aggregate: the aggregate the server computed (with any noise a defense added).
    """

    round: int
    global_state: TensorDict
    updates: tuple[ClientUpdate, ...]
    plans: Mapping[int, LocalPlan]
    aggregate: TensorDict | None = None


@dataclass(frozen=True)
class CostRecord:
    """Communication and compute per round, averaged over participating clients.

    Attributes:
        bytes_up_per_client: bytes one client sends in a round (all protocol stages).
        bytes_down_per_client: bytes the server sends one client in a round.
        client_seconds: one client's compute per round (training, defenses, protocol).
        server_seconds: the server's compute per round (aggregation, protocol, key holder).
        stages: per protocol stage, mean bytes up and down per client that took part.
        network_seconds: mean simulated time per round spent waiting on the network.
        clipped: entries the protocol's encoding clipped to its range, over the whole run.
    """

    bytes_up_per_client: int
    bytes_down_per_client: int
    client_seconds: float
    server_seconds: float
    stages: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    network_seconds: float = 0.0
    clipped: int = 0


@dataclass(frozen=True)
class FederationResult:
    """The outcome of a simulated federation (`stopped`: why it ended early, if it did)."""

    final_state: TensorDict
    rounds: tuple[RoundRecord, ...]
    captures: Mapping[int, Capture]
    engine: str
    cost: CostRecord
    initial_test_accuracy: float
    stopped: str | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module, state: TensorDict, x: torch.Tensor, y: torch.Tensor, *, chunk: int = 1024
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of `model` holding `state` on (x, y)."""
    model.load_state_dict(state)
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, x.shape[0], chunk):
        logits = model(x[start : start + chunk])
        target = y[start : start + chunk]
        correct += int((logits.argmax(dim=1) == target).sum())
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    n = max(int(x.shape[0]), 1)
    return correct / n, loss / n


def choose_engine(model: nn.Module, requested: str, *, needs_loop: bool = False) -> str:
    """`vectorised` where the model and the defenses allow it (no BatchNorm, no per-client
    training hook), else `loop`."""
    if requested == "vectorised" and has_batchnorm(model):
        raise ConfigError(
            "federation.engine: 'vectorised' cannot train a model with BatchNorm (its running "
            "statistics are per-client state); use 'loop' or 'auto'"
        )
    if requested == "vectorised" and needs_loop:
        raise ConfigError(
            "federation.engine: 'vectorised' cannot run a defense that hooks into each client's "
            "training (federated_dropout, private_head); use 'loop' or 'auto'"
        )
    if requested == "auto":
        return "loop" if has_batchnorm(model) or needs_loop else "vectorised"
    return requested


def run_federation(
    model: nn.Module,
    dataset: Dataset,
    client_indices: Sequence[np.ndarray],
    spec: FederationSpec,
    *,
    seed: int,
    capture_rounds: Collection[int] = (),
    defenses: DefenseStack | None = None,
    protocol: AggregationProtocol | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> FederationResult:
    """Simulate up to `spec.rounds` rounds of FedSGD or FedAvg on `dataset` split by client.

    Args:
        model: the global model; its current state is the initial global model.
        dataset: training and test data in model space.
        client_indices: per client, its indices into ``dataset.x_train``.
        spec: the federation settings.
        seed: the scenario seed; every random choice derives a named stream from it.
        capture_rounds: rounds whose traffic is kept (for the adversary and the scorer).
        defenses: the client-side defenses (see `defenses.base`); they may change local
            training, transform each update, prescribe the server's aggregate, and stop training
            before a round (a privacy budget spent).
        protocol: the server-side aggregation protocol (secure aggregation, homomorphic
            encryption); None sums the updates in the clear.
        on_round: called after every round (for progress display).

    Returns:
        The final model state, the per-round records, the captured rounds and, when a defense
        stopped training early, its reason.
    """
    defenses = defenses or DefenseStack()
    engine = choose_engine(model, spec.engine, needs_loop=defenses.needs_loop_engine)
    train = train_clients_vectorised if engine == "vectorised" else train_clients_loop
    param_names = frozenset(name for name, _ in model.named_parameters())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scratch = copy.deepcopy(model)
    kind = "gradient" if spec.algorithm == "fedsgd" else "delta"
    x, y = dataset.x_train, dataset.y_train
    initial_accuracy, _ = _evaluate_states(model, state, dataset, defenses)

    records: list[RoundRecord] = []
    captures: dict[int, Capture] = {}
    up_bytes: list[int] = []
    client_seconds: list[float] = []
    server_seconds: list[float] = []
    down_bytes = tensor_bytes(state)
    stopped: str | None = None
    weight_unit = float(np.mean([len(c) for c in client_indices])) or 1.0
    stage_log: list[tuple[StageCost, ...]] = []  # per protocol round that produced a sum
    clipped = 0
    network_seconds: list[float] = []
    for rnd in range(1, spec.rounds + 1):
        sampled = sample_clients(
            len(client_indices),
            clients_per_round=spec.clients_per_round,
            sample_rate=spec.sample_rate,
            rng=numpy_rng(seed, "sampling", rnd),
        )
        stopped = defenses.stop_reason(rnd, [int(c) for c in sampled])
        if stopped is not None:
            logger.warning("training stopped before round %d: %s", rnd, stopped)
            break
        declined = np.array([c for c in sampled if not defenses.admits(int(c), rnd)], np.int64)
        willing = np.setdiff1d(sampled, declined)
        survivors, dropped = drop_clients(
            willing, dropout_rate=spec.dropout_rate, rng=numpy_rng(seed, "dropout", rnd)
        )
        rules = [defenses.local_training(int(c), rnd) for c in survivors]
        plans = [
            plan_local_batches(
                int(c),
                client_indices[int(c)],
                algorithm=spec.algorithm,
                batch_size=spec.local.batch_size,
                epochs=spec.local.epochs,
                steps=spec.local.steps,
                rng=numpy_rng(seed, "local", rnd, int(c)),
                poisson=rule is not None and rule.poisson_batches,
            )
            for c, rule in zip(survivors, rules, strict=True)
        ]
        started = time.perf_counter()
        dp_sgd = any(r is not None and r.dp_sgd is not None for r in rules)
        tensors = (
            train(
                model,
                state,
                x,
                y,
                plans,
                algorithm=spec.algorithm,
                lr=spec.local.lr,
                batchnorm=spec.local.batchnorm,
                rules=rules if any(r is not None for r in rules) else (),
                generators=[torch_generator(seed, "dp_sgd", rnd, p.client_id) for p in plans]
                if dp_sgd
                else (),
            )
            if plans
            else []
        )
        updates = []
        for plan, update_tensors in zip(plans, tensors, strict=True):
            update = ClientUpdate(plan.client_id, rnd, kind, update_tensors, plan.num_examples)
            update = defenses.transform(
                update,
                rng_for=functools.partial(_defense_rng, seed, rnd, plan.client_id),
                local=LocalData(scratch, state, x, y, torch.as_tensor(plan.used)),
            )
            updates.append(update)
        if plans:
            client_seconds.append((time.perf_counter() - started) / len(plans))
            up_bytes.extend(u.size_bytes for u in updates)

        started = time.perf_counter()
        info = RoundInfo(rnd, tuple(int(c) for c in sampled))
        server_rng = torch_generator(seed, "server_defense", rnd)
        network = None
        if protocol is not None or spec.network is not None:
            stages = protocol.stages if protocol is not None else ("upload",)
            network = Network(spec.network, stages, numpy_rng(seed, "network", rnd))
        aborted: str | None = None
        recovered: tuple[int, ...] = ()
        if protocol is not None and updates:
            try:
                result, aggregate = _secure_aggregate(
                    protocol, defenses, updates, info, network, state, weight_unit, server_rng
                )
            except AggregationAbortedError as exc:
                aborted, aggregate, arrived = str(exc), None, []
                logger.warning("%s", exc)
            else:
                arrived = [u for u in updates if u.client_id in set(result.included)]
                recovered = result.recovered
                stage_log.append(result.stages)
                clipped += result.clipped
                client_seconds[-1] += result.client_seconds / len(updates)
                started -= result.client_seconds  # counted as the clients' time above
        else:
            arrived = updates
            if network is not None and updates:
                ids = set(network.arrivals("upload", {u.client_id: u.size_bytes for u in updates}))
                arrived = [u for u in updates if u.client_id in ids]
            aggregate = defenses.aggregate(arrived, info, rng=server_rng)
            if aggregate is None and arrived:
                aggregate = weighted_mean(arrived)
        if network is not None and updates:
            network_seconds.append(sum(c.network_seconds for c in network.costs()))
        lost = tuple(sorted({u.client_id for u in updates} - {u.client_id for u in arrived}))
        if rnd in capture_rounds:
            plans_by_client = {p.client_id: p for p in plans}
            captures[rnd] = Capture(rnd, state, tuple(arrived), plans_by_client, aggregate)
        if aggregate is not None:
            state = apply_aggregate(
                state, aggregate, kind=kind, lr=spec.local.lr, param_names=param_names
            )
        elif aborted is None:
            logger.warning("round %d: no client update arrived; the model is unchanged", rnd)
        defenses.end_round(arrived, info)
        server_seconds.append(time.perf_counter() - started)

        accuracy, loss = _evaluate_states(model, state, dataset, defenses)
        record = RoundRecord(
            rnd,
            tuple(int(c) for c in sampled),
            tuple(int(c) for c in dropped),
            accuracy,
            loss,
            declined=tuple(int(c) for c in declined),
            lost=lost,
            recovered=recovered,
            aborted=aborted,
        )
        records.append(record)
        logger.info("round %d: %d clients, test accuracy %.4f", rnd, len(updates), accuracy)
        if on_round is not None:
            on_round(record)

    model.load_state_dict(state)
    stage_costs = _stage_means(stage_log)
    if stage_log:  # what the protocol's messages weigh replaces the plain update's size
        up_bytes = [int(sum(v["bytes_up"] for v in stage_costs.values()))]
        down_bytes = int(sum(v["bytes_down"] for v in stage_costs.values()))
    cost = CostRecord(
        bytes_up_per_client=int(np.mean(up_bytes)) if up_bytes else 0,
        bytes_down_per_client=down_bytes,
        client_seconds=float(np.mean(client_seconds)) if client_seconds else 0.0,
        server_seconds=float(np.mean(server_seconds)) if server_seconds else 0.0,
        stages=stage_costs,
        network_seconds=float(np.mean(network_seconds)) if network_seconds else 0.0,
        clipped=clipped,
    )
    return FederationResult(
        state, tuple(records), captures, engine, cost, initial_accuracy, stopped=stopped
    )


def _secure_aggregate(
    protocol: AggregationProtocol,
    defenses: DefenseStack,
    updates: Sequence[ClientUpdate],
    info: RoundInfo,
    network: Network | None,
    state: TensorDict,
    weight_unit: float,
    rng: torch.Generator,
) -> tuple[SecureSum, TensorDict]:
    """The round's aggregate through `protocol`: summands in, the sum out, the aggregate from it.

    Raises:
        AggregationAbortedError: the protocol aborted the round.
        ConfigError: the clients' summands do not share one layout (a defense that makes
            clients send different tensors cannot run under a secure sum).
    """
    summands = [defenses.summand(u, weight_unit=weight_unit) for u in updates]
    layout = SumLayout.of(summands[0][0], sorted(summands[0][1]))
    contributions = []
    for update, (tensors, counts) in zip(updates, summands, strict=True):
        try:
            values, stats = layout.flatten(tensors, counts)
        except ValueError as exc:
            raise ConfigError(
                f"defenses.server: client {update.client_id}'s update cannot join a secure sum "
                f"({exc}); every client must send the same tensors"
            ) from None
        contributions.append(Contribution(update.client_id, values, stats))
    result = protocol.secure_sum(
        contributions, round=info.round, cohort=len(info.sampled), network=network
    )
    total, counts = layout.unflatten(result.values, result.counts)
    aggregate = defenses.from_sum(
        total, counts, info, rng=rng, template=state, weight_unit=weight_unit
    )
    return result, aggregate


def _stage_means(rounds: Sequence[tuple[StageCost, ...]]) -> dict[str, dict[str, float]]:
    """Per stage, mean bytes up and down per client that took part in it, over the rounds."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(s.stage for stages in rounds for s in stages):
        costs = [s for stages in rounds for s in stages if s.stage == name]
        clients = sum(s.clients for s in costs) or 1
        out[name] = {
            "bytes_up": sum(s.bytes_up for s in costs) / clients,
            "bytes_down": sum(s.bytes_down for s in costs) / clients,
            "network_seconds": sum(s.network_seconds for s in costs) / len(costs),
        }
    return out


def _defense_rng(seed: int, rnd: int, client: int, index: int) -> torch.Generator:
    """The random stream of client `client`'s `index`-th defense in round `rnd`."""
    return torch_generator(seed, "defense", rnd, client, index)


def _evaluate_states(
    model: nn.Module, state: TensorDict, dataset: Dataset, defenses: DefenseStack
) -> tuple[float, float]:
    """Test accuracy and loss of the global model, or the mean over personalised models."""
    states = defenses.evaluation_states(state) or [state]
    scores = [evaluate(model, s, dataset.x_test, dataset.y_test) for s in states]
    model.load_state_dict(state)
    return float(np.mean([a for a, _ in scores])), float(np.mean([loss for _, loss in scores]))
