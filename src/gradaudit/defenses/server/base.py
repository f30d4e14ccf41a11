"""What a server-side aggregation protocol is, and the values it exchanges with the round loop.

A protocol computes one thing: the sum of the clients' contributions, while revealing to the
server no more than its :attr:`AggregationProtocol.visibility` says. The round loop turns each
client's (defended) update into a :class:`Contribution` with the client defenses' ``summand``
hook, hands the contributions to :meth:`AggregationProtocol.secure_sum`, and turns the
:class:`SecureSum` back into the aggregate with their ``from_sum`` hook (a weighted mean by
default; DP-FedAvg adds its noise there).

The parties are simulated in one process, but they talk only through serialised messages that a
:class:`~gradaudit.defenses.server.network.Network` delivers, drops or delays, and whose bytes it
counts per stage.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from gradaudit.errors import GradauditError
from gradaudit.types import TensorDict, Visibility

if TYPE_CHECKING:
    from gradaudit.defenses.base import DefenseContext


class AggregationAbortedError(GradauditError):
    """The protocol could not finish the round safely (too few clients left); the server learnt
    no sum and no client's input."""


class ProtocolError(GradauditError):
    """A message was malformed, forged, replayed or tampered with, or a party asked for what the
    protocol forbids; the message names the party and the stage."""


@dataclass(frozen=True)
class Contribution:
    """What one client feeds into the secure sum. Private to the client until aggregated.

    Attributes:
        client_id: the client.
        values: float64 vector: the client's summand tensors, flattened by a :class:`SumLayout`.
        counts: int64 vector of small integer statistics (example count, a clipped bit), summed
            exactly.
    """

    client_id: int
    values: np.ndarray
    counts: np.ndarray


@dataclass(frozen=True)
class StageCost:
    """Traffic of one protocol stage in one round (sums over the clients that took part).

    Attributes:
        stage: the stage's name.
        clients: clients that sent a message in this stage.
        bytes_up: bytes those clients sent.
        bytes_down: bytes the server sent to them.
        network_seconds: simulated time the server waited for the stage's messages.
    """

    stage: str
    clients: int
    bytes_up: int
    bytes_down: int
    network_seconds: float = 0.0


@dataclass(frozen=True)
class SecureSum:
    """The outcome of one round of a protocol.

    Attributes:
        values: float64 sum of the included clients' value vectors (decoded).
        counts: int64 sum of their count vectors.
        included: clients whose input is in the sum.
        dropped: clients that started the protocol but whose input is not in the sum.
        recovered: clients whose input is in the sum although they did not answer the last
            stage (they dropped, or refused the server's request): secure aggregation rebuilds
            their self masks from their neighbours' shares.
        clipped: entries the encoding clipped to its range, over all included inputs.
        stages: traffic per stage.
        client_seconds: compute time of all clients together.
        server_seconds: compute time of the server (and of a key authority, when there is one).
    """

    values: np.ndarray
    counts: np.ndarray
    included: tuple[int, ...]
    dropped: tuple[int, ...] = ()
    recovered: tuple[int, ...] = ()
    clipped: int = 0
    stages: tuple[StageCost, ...] = ()
    client_seconds: float = 0.0
    server_seconds: float = 0.0

    @property
    def network_seconds(self) -> float:
        """Simulated waiting on the network over all stages."""
        return sum(s.network_seconds for s in self.stages)


class AggregationProtocol(abc.ABC):
    """Base of server-side aggregation protocols (DESIGN.md's ``SecureAggregation``).

    Attributes:
        name: the registry name.
        visibility: what the server sees of individual updates under this protocol.
        stages: the protocol's stages in order (network dropouts may strike at each).
        guarantee: what the protocol guarantees, in words, and under which assumptions.
    """

    name: ClassVar[str] = "protocol"
    visibility: ClassVar[Visibility] = Visibility.INDIVIDUAL
    stages: ClassVar[tuple[str, ...]] = ("upload",)
    guarantee: str = ""

    @abc.abstractmethod
    def secure_sum(
        self,
        contributions: Sequence[Contribution],
        *,
        round: int,
        cohort: int,
        network: Any,
    ) -> SecureSum:
        """The sum of the contributions that survive `network`.

        Args:
            contributions: one per client that finished local training, in client order.
            round: the round (bound into every message, so old messages cannot be replayed).
            cohort: clients sampled this round (bounds the sum, for fixed-point encodings).
            network: the :class:`~gradaudit.defenses.server.network.Network` of this round.

        Raises:
            AggregationAbortedError: too few clients remain to finish without revealing an input.
        """

    def describe(self) -> dict[str, Any]:
        """The report's entry: kind, guarantee, visibility, parameters, notes and warnings."""
        params = getattr(self, "params", None)
        return {
            "kind": self.name,
            "guarantee": self.guarantee,
            "visibility": self.visibility.value,
            "params": params.model_dump(mode="json") if params is not None else {},
            "notes": list(self.notes()),
            "warnings": [],
        }

    def notes(self) -> list[str]:
        """What the user must know about the protocol's trust model."""
        return []


def max_cohort(context: DefenseContext) -> int:
    """The most clients whose inputs one round can sum (fixed cohort, else every client)."""
    fed = context.federation
    return int(fed.clients_per_round) if fed.clients_per_round is not None else context.num_clients


def check_contributions(
    contributions: Sequence[Contribution],
    *,
    round: int,
    cohort: int,
    name: str,
    limit: int | None = None,
) -> tuple[int, int]:
    """(values, counts) per contribution, after checking the round can be summed at all.

    Raises:
        ValueError: more inputs than `limit` (what the protocol's encoding was sized for, if
            anything), or contributions of different sizes.
        AggregationAbortedError: no contribution.
    """
    inputs = max(cohort, len(contributions))
    if limit is not None and inputs > limit:
        raise ValueError(f"{name} sums at most {limit} inputs, but round {round} has {inputs}")
    if not contributions:
        raise AggregationAbortedError(f"round {round}: no client took part in the {name} sum")
    n_values = contributions[0].values.size
    n_counts = contributions[0].counts.size
    if any(c.values.size != n_values or c.counts.size != n_counts for c in contributions):
        raise ValueError("the clients' contributions differ in size")
    return n_values, n_counts


def provision(
    network: Any, stage: str, material: bytes, clients: Sequence[int], provisioned: set[int]
) -> None:
    """Send `material` (a public key) to each of `clients` not yet in `provisioned`, once;
    those it reached join `provisioned`."""
    new = {c: material for c in clients if c not in provisioned}
    if new:
        provisioned |= set(network.send_down(stage, new))


def collect_uploads(
    network: Any,
    stage: str,
    uploads: Mapping[int, bytes],
    *,
    round: int,
    name: str,
) -> tuple[dict[int, bytes], tuple[int, ...], tuple[int, ...]]:
    """(the uploads that arrived, their senders, the senders whose upload was lost).

    Raises:
        AggregationAbortedError: no upload arrived, so there is no sum.
    """
    arrived = network.deliver(stage, uploads)
    included = tuple(sorted(arrived))
    dropped = tuple(sorted(set(uploads) - set(arrived)))
    if not included:
        raise AggregationAbortedError(
            f"round {round}: no client's {name} upload reached the server "
            f"({len(dropped)} dropped), so there is no sum"
        )
    return arrived, included, dropped


@dataclass(frozen=True)
class SumLayout:
    """How a client's summand tensors and count statistics become flat vectors, and back.

    Attributes:
        shapes: per key the tensor's shape, in order.
        dtypes: per key the tensor's dtype.
        count_names: the names of the integer statistics, in order.
    """

    shapes: Mapping[str, torch.Size]
    dtypes: Mapping[str, torch.dtype]
    count_names: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], count_names: Sequence[str]) -> SumLayout:
        """The layout of `tensors` (keys in their order) with `count_names`."""
        return cls(
            {k: v.shape for k, v in tensors.items()},
            {k: v.dtype for k, v in tensors.items()},
            tuple(count_names),
        )

    @property
    def size(self) -> int:
        """Entries of the value vector."""
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes.values())

    def flatten(
        self, tensors: Mapping[str, torch.Tensor], counts: Mapping[str, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(float64 values, int64 counts) of one client's summand.

        Raises:
            ValueError: a key or a statistic is missing, or a shape differs from the layout.
        """
        parts = []
        for key, shape in self.shapes.items():
            if key not in tensors:
                raise ValueError(f"the summand has no tensor {key!r}")
            if tensors[key].shape != shape:
                raise ValueError(f"summand tensor {key!r} has shape {tuple(tensors[key].shape)}")
            parts.append(tensors[key].detach().to(torch.float64).reshape(-1).numpy())
        missing = [n for n in self.count_names if n not in counts]
        if missing:
            raise ValueError(f"the summand has no statistic {missing}")
        values = np.concatenate(parts) if parts else np.zeros(0)
        return values, np.array([int(counts[n]) for n in self.count_names], dtype=np.int64)

    def unflatten(
        self, values: np.ndarray, counts: np.ndarray
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Float64 tensors keyed like the layout, and the named counts."""
        tensors: TensorDict = {}
        start = 0
        for key, shape in self.shapes.items():
            n = int(np.prod(shape, dtype=np.int64))
            tensors[key] = torch.from_numpy(np.array(values[start : start + n])).reshape(shape)
            start += n
        return tensors, {n: int(c) for n, c in zip(self.count_names, counts, strict=True)}
