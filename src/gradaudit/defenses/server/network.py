"""A simulated unreliable network: per-stage dropouts, latency, bandwidth and stragglers.

The parties of an aggregation protocol hand their serialised messages to a :class:`Network`,
which decides who is still reachable at each stage, counts the bytes each way, and adds up the
time the server waits. The randomness here models the network, not a secret, so it comes from
the scenario's seeded stream and a run reproduces its dropouts exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from gradaudit.config import NetworkSpec
from gradaudit.defenses.server.base import StageCost
from gradaudit.errors import ConfigError


def stage_dropout(spec: NetworkSpec | None, stages: Sequence[str]) -> dict[str, float]:
    """The dropout probability at each of `stages`.

    Raises:
        ConfigError: the spec names a stage the protocol does not have.
    """
    if spec is None:
        return dict.fromkeys(stages, 0.0)
    if isinstance(spec.dropout, dict):
        unknown = sorted(set(spec.dropout) - set(stages))
        if unknown:
            raise ConfigError(
                f"federation.network.dropout: unknown stage(s) {unknown}; this aggregation "
                f"protocol has the stages {list(stages)}"
            )
        return {s: float(spec.dropout.get(s, 0.0)) for s in stages}
    rate = float(spec.dropout)
    if spec.dropout_scope == "round":
        rate = 1 - (1 - rate) ** (1 / len(stages))
    return dict.fromkeys(stages, rate)


@dataclass
class Network:
    """The network of one round: who is reachable, what travelled, how long the server waited.

    Args:
        spec: the network's settings (None: reliable, instantaneous).
        stages: the protocol's stages, in order.
        rng: the round's network stream.
    """

    spec: NetworkSpec | None
    stages: Sequence[str]
    rng: np.random.Generator
    _dropout: dict[str, float] = field(init=False)
    _costs: dict[str, StageCost] = field(init=False, default_factory=dict)
    gone: set[int] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._dropout = stage_dropout(self.spec, self.stages)

    def deliver(self, stage: str, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        """The messages of `stage` that reach the server, keyed by sender.

        A sender already gone, or one that drops now, or whose message arrives after the
        timeout, sends nothing (a straggler is gone for the rest of the round).
        """
        arrived = self.arrivals(stage, {c: len(m) for c, m in messages.items()})
        return {c: messages[c] for c in arrived}

    def arrivals(self, stage: str, sizes: Mapping[int, int]) -> list[int]:
        """The senders whose message of `sizes[sender]` bytes reaches the server in `stage`."""
        arrived: list[int] = []
        latest = 0.0
        late = False
        rate = self._dropout[stage]
        for sender in sorted(sizes):
            if sender in self.gone:
                continue
            if rate > 0 and self.rng.random() < rate:
                self.gone.add(sender)
                continue
            delay = self._delay(sizes[sender])
            if self.spec is not None and delay > self.spec.timeout:
                self.gone.add(sender)
                late = True
                continue
            latest = max(latest, delay)
            arrived.append(sender)
        waited = self.spec.timeout if late and self.spec is not None else latest
        self._add(
            stage,
            clients=len(arrived),
            bytes_up=sum(sizes[c] for c in arrived),
            network_seconds=waited,
        )
        return arrived

    def send_down(self, stage: str, messages: Mapping[int, bytes]) -> dict[int, bytes]:
        """The server's messages of `stage` to clients still reachable (counted as bytes down)."""
        reached = {c: m for c, m in messages.items() if c not in self.gone}
        waited = 0.0
        if self.spec is not None and reached:
            waited = max(self._delay(len(m)) for m in reached.values())
        self._add(stage, bytes_down=sum(len(m) for m in reached.values()), network_seconds=waited)
        return reached

    def alive(self, clients: Sequence[int]) -> list[int]:
        """The clients of `clients` still reachable."""
        return [c for c in clients if c not in self.gone]

    def costs(self) -> tuple[StageCost, ...]:
        """Traffic and waiting per stage so far, in the protocol's stage order."""
        return tuple(self._costs[s] for s in self.stages if s in self._costs)

    def _add(self, stage: str, **amounts: float) -> None:
        """Add `amounts` (StageCost fields) to `stage`'s tally."""
        old = self._costs.get(stage, StageCost(stage, 0, 0, 0))
        self._costs[stage] = replace(old, **{k: getattr(old, k) + v for k, v in amounts.items()})

    def _delay(self, size: int) -> float:
        spec = self.spec
        if spec is None:
            return 0.0
        latency = spec.latency_median * float(np.exp(spec.latency_sigma * self.rng.normal()))
        if spec.bandwidth_mbps is not None:
            latency += 8 * size / (spec.bandwidth_mbps * 1e6)
        return latency
