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
from gradaudit.defenses.base import DefenseStack, LocalData, LocalTraining, RoundInfo
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
        global_state: the model the server sent at the start of the round (its honest global
            model; a malicious server may have sent some clients another one, see `sent`).
        updates: every update that reached the server (after client-side defenses).
        plans: PRIVATE: which examples each client used. Attacks never see this.
        aggregate: the aggregate the server computed (with any noise a defense added).
        sent: the clients a malicious server sent a model other than `global_state`, and what
            it sent them (``run_federation``'s `server_edit`); empty for an honest server.
    """

    round: int
    global_state: TensorDict
    updates: tuple[ClientUpdate, ...]
    plans: Mapping[int, LocalPlan]
    aggregate: TensorDict | None = None
    sent: Mapping[int, TensorDict] = field(default_factory=dict)

    def received(self, client: int) -> TensorDict:
        """The model `client` received this round: its edited one, else the global one."""
        return self.sent.get(client, self.global_state)


ServerEdit = Callable[[int, TensorDict], Mapping[int, TensorDict]]
"""A malicious server's choice, called as ``edit(round, global_state)`` at the start of every
round: per client, the model state it sends that client instead of the global one (an empty
mapping sends everyone the global model)."""


@dataclass(frozen=True)
class CraftedClient:
    """A client whose update is computed, not trained: a canary of a privacy audit.

    Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning" (ICLR 2024):
    a canary client takes part whenever it is sampled, like any client, but sends a crafted
    update; the client defenses (clipping, noise) and the server's aggregation treat it exactly
    as a real one.

    Attributes:
        update: ``update(round, received_state)``: the raw update (keyed like the model's state,
            before any client defense): a gradient for FedSGD, a model change for FedAvg.
        num_examples: the example count the client reports (FedAvg weighting).
    """

    update: Callable[[int, TensorDict], TensorDict]
    num_examples: int


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
    server_edit: ServerEdit | None = None,
    crafted: Mapping[int, CraftedClient] | None = None,
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
        server_edit: a malicious server: per round, the clients it sends another model than the
            global one (Nasr, Shokri & Houmansadr, IEEE S&P 2019, active attacks). Those clients
            train from the model they received; the server still applies the aggregate to its
            own global model. The captured rounds record what each edited client received
            (`Capture.sent`). None: an honest server (the run is unchanged bit for bit).
        crafted: clients (ids into `client_indices`, whose entries are usually empty) that send
            a computed update instead of training (`CraftedClient`, the canaries of
            `audit.dp_audit`); they are sampled, dropped, defended and aggregated like the rest.

    Returns:
        The final model state, the per-round records, the captured rounds and, when a defense
        stopped training early, its reason.
    """
    defenses = defenses or DefenseStack()
    crafted = dict(crafted or {})
    if any(not 0 <= c < len(client_indices) for c in crafted):
        raise ValueError(
            f"crafted clients {sorted(crafted)} must be ids below {len(client_indices)} (the "
            "number of client_indices entries)"
        )
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
        sent = _edited_states(server_edit, rnd, state, sampled)
        rules = [defenses.local_training(int(c), rnd) for c in survivors]
        plans = [
            LocalPlan(int(c), ())
            if int(c) in crafted
            else plan_local_batches(
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
        tensors = _train_round(
            train,
            model,
            state,
            sent,
            x,
            y,
            [(p, r) for p, r in zip(plans, rules, strict=True) if p.client_id not in crafted],
            spec=spec,
            seed=seed,
            rnd=rnd,
        )
        updates = []
        for plan in plans:
            received = sent.get(plan.client_id, state)
            canary = crafted.get(plan.client_id)
            if canary is not None:
                update_tensors = _checked_state(
                    canary.update(rnd, received), state, what=f"crafted client {plan.client_id}"
                )
                count = canary.num_examples
            else:
                update_tensors, count = tensors[plan.client_id], plan.num_examples
            update = ClientUpdate(plan.client_id, rnd, kind, update_tensors, count)
            update = defenses.transform(
                update,
                rng_for=functools.partial(_defense_rng, seed, rnd, plan.client_id),
                local=LocalData(scratch, received, x, y, torch.as_tensor(plan.used)),
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
            captures[rnd] = Capture(
                rnd, state, tuple(arrived), plans_by_client, aggregate, sent=dict(sent)
            )
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


def _edited_states(
    server_edit: ServerEdit | None, rnd: int, state: TensorDict, sampled: np.ndarray
) -> dict[int, TensorDict]:
    """The models a malicious server sends the round's sampled clients instead of `state`.

    Raises:
        ValueError: an edited state is not keyed, shaped and typed like the global one.
    """
    if server_edit is None:
        return {}
    chosen = {int(c) for c in sampled}
    edits = server_edit(rnd, {k: v.clone() for k, v in state.items()})
    return {
        int(c): _checked_state(s, state, what=f"the state sent to client {c}")
        for c, s in edits.items()
        if int(c) in chosen
    }


def _checked_state(
    tensors: Mapping[str, torch.Tensor], like: TensorDict, *, what: str
) -> TensorDict:
    """`tensors` as a detached TensorDict, after checking it matches `like` key for key.

    Raises:
        ValueError: a key is missing or extra, or a tensor's shape or dtype differs.
    """
    if set(tensors) != set(like):
        missing, extra = sorted(set(like) - set(tensors)), sorted(set(tensors) - set(like))
        raise ValueError(f"{what}: keys differ from the model's (missing {missing}, extra {extra})")
    out: TensorDict = {}
    for key, ref in like.items():
        value = tensors[key]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise ValueError(
                f"{what}: {key} is {tuple(value.shape)} {value.dtype}, the model's is "
                f"{tuple(ref.shape)} {ref.dtype}"
            )
        out[key] = value.detach()
    return out


def _train_round(
    train: Callable[..., list[TensorDict]],
    model: nn.Module,
    state: TensorDict,
    sent: Mapping[int, TensorDict],
    x: torch.Tensor,
    y: torch.Tensor,
    jobs: Sequence[tuple[LocalPlan, LocalTraining | None]],
    *,
    spec: FederationSpec,
    seed: int,
    rnd: int,
) -> dict[int, TensorDict]:
    """Per client, the update of its local training from the model it received.

    The clients that received the global model train together in one call of the engine (so a
    round without edits runs exactly as it always has); each client a malicious server sent
    another model trains on its own from that model.
    """
    groups: list[tuple[TensorDict, list[tuple[LocalPlan, LocalTraining | None]]]] = []
    common = [job for job in jobs if job[0].client_id not in sent]
    if common:
        groups.append((state, common))
    groups += [(sent[job[0].client_id], [job]) for job in jobs if job[0].client_id in sent]
    out: dict[int, TensorDict] = {}
    for start, group in groups:
        plans = [plan for plan, _ in group]
        rules = [rule for _, rule in group]
        dp_sgd = any(r is not None and r.dp_sgd is not None for r in rules)
        tensors = train(
            model,
            start,
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
        out.update({p.client_id: t for p, t in zip(plans, tensors, strict=True)})
    return out


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
