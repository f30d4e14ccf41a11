"""The privacy ledger: what ran, as DP events, and the epsilon it costs (Google's dp-accounting).

Every differentially private mechanism that runs during an audit records one
:class:`GaussianRound` per round (or per local step, for DP-SGD inside a client): its noise
multiplier, how its participants were sampled, and how many times it repeats. A
:class:`PrivacyLedger` turns the records into dp-accounting ``DpEvent`` objects and asks an RDP
accountant (default; Mironov 2017, Mironov, Talwar & Zhang 2019) or a privacy-loss-distribution
accountant (Koskela et al. 2020; Doroshenko et al. 2022) for epsilon at a given delta. The
result always carries its delta, level (``sample`` or ``client``), accountant and neighbouring
relation: an epsilon without them means nothing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import dp_accounting
from dp_accounting import pld, rdp

Level = Literal["sample", "client"]
AccountantKind = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed", "all"]
Neighbours = Literal["add_remove", "replace_one"]

_RELATIONS = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


@dataclass(frozen=True)
class GaussianRound:
    """One Gaussian mechanism on a sampled group, repeated `count` times.

    Attributes:
        noise_multiplier: noise standard deviation divided by the clipping norm (sigma).
        sampling: ``poisson`` (each unit joins independently with `sample_rate`), ``fixed``
            (exactly `sample_size` of `population` without replacement) or ``all``.
        sample_rate: the Poisson probability (``poisson`` only).
        sample_size: units drawn per repetition (``fixed`` only).
        population: units to draw from (``fixed`` only).
        count: how many times the mechanism runs (rounds or steps).
    """

    noise_multiplier: float
    sampling: Sampling = "poisson"
    sample_rate: float = 1.0
    sample_size: int = 0
    population: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")
        if self.sampling == "poisson" and not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.sampling == "fixed" and not 0 < self.sample_size <= self.population:
            raise ValueError(
                f"a fixed-size sample needs 0 < sample_size <= population, got "
                f"{self.sample_size} of {self.population}"
            )

    def event(self) -> dp_accounting.DpEvent:
        """The dp-accounting event of all `count` repetitions."""
        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "poisson" and self.sample_rate < 1:
            one: dp_accounting.DpEvent = dp_accounting.PoissonSampledDpEvent(
                self.sample_rate, gaussian
            )
        elif self.sampling == "fixed" and self.sample_size < self.population:
            one = dp_accounting.SampledWithoutReplacementDpEvent(
                self.population, self.sample_size, gaussian
            )
        else:
            one = gaussian
        return dp_accounting.SelfComposedDpEvent(one, self.count)


@dataclass(frozen=True)
class PrivacyReport:
    """An epsilon and everything needed to read it (the report's ``privacy`` block).

    Attributes:
        epsilon: the accountant's epsilon for the whole run (inf when nothing bounds it).
        delta: the delta it holds at.
        level: ``sample`` (one training example) or ``client`` (a client's whole data).
        accountant: ``rdp`` or ``pld``.
        neighbours: ``add_remove`` or ``replace_one``.
        per_client: epsilon of each client where they differ (client id -> epsilon).
    """

    epsilon: float
    delta: float
    level: Level
    accountant: AccountantKind
    neighbours: Neighbours = "add_remove"
    per_client: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """The JSON form (epsilon inf becomes None: unbounded)."""
        return {
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else None,
            "delta": self.delta,
            "level": self.level,
            "accountant": self.accountant,
            "neighbours": self.neighbours,
            "per_client": {str(k): v for k, v in sorted(self.per_client.items())},
        }


def epsilon(
    rounds: Sequence[GaussianRound],
    delta: float,
    *,
    accountant: AccountantKind = "rdp",
    neighbours: Neighbours = "add_remove",
) -> float:
    """Epsilon at `delta` of the composition of `rounds`.

    Example (Abadi et al.'s setting, q = 0.01, sigma = 1.1, 10 000 steps):
        >>> round(epsilon([GaussianRound(1.1, sample_rate=0.01, count=10_000)], 1e-5), 3)
        5.632
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    relation = _RELATIONS[neighbours]
    if accountant == "rdp":
        acc: dp_accounting.PrivacyAccountant = rdp.RdpAccountant(neighboring_relation=relation)
    elif accountant == "pld":
        acc = pld.PLDAccountant(neighboring_relation=relation)
    else:
        raise ValueError(f"unknown accountant {accountant!r}; use 'rdp' or 'pld'")
    events = [r.event() for r in rounds if r.count > 0]
    if not events:
        return 0.0
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


def _append(history: list[GaussianRound], mechanism: GaussianRound) -> None:
    """Add `mechanism` to `history`, merged into the last entry when it repeats it."""
    if history and replace(history[-1], count=0) == replace(mechanism, count=0):
        history[-1] = replace(history[-1], count=history[-1].count + mechanism.count)
    else:
        history.append(mechanism)


@functools.lru_cache(maxsize=4096)
def _cached_epsilon(
    rounds: tuple[GaussianRound, ...],
    delta: float,
    accountant: AccountantKind,
    neighbours: Neighbours,
) -> float:
    """`epsilon`, memoised: clients with the same history share one accountant call."""
    return epsilon(rounds, delta, accountant=accountant, neighbours=neighbours)


@dataclass
class PrivacyLedger:
    """The DP events of one run, per client, and their epsilon.

    Mechanisms call :meth:`record` as they run; :meth:`report` composes what each client took
    part in. With one noise multiplier for everyone the clients' epsilons coincide and the
    report gives one number; with per-client (or per-cohort) multipliers it lists each.

    Attributes:
        level: what one neighbouring change is (an example or a client's data).
        delta: the delta the report is given at.
        accountant: ``rdp`` (default) or ``pld``.
        neighbours: ``add_remove`` or ``replace_one``.
    """

    level: Level
    delta: float
    accountant: AccountantKind = "rdp"
    neighbours: Neighbours = "add_remove"
    _rounds: dict[int, list[GaussianRound]] = field(default_factory=dict)

    def record(self, client: int, mechanism: GaussianRound) -> None:
        """Add one mechanism `client` was subject to (a repeat of the last one is counted)."""
        _append(self._rounds.setdefault(client, []), mechanism)

    def epsilon_of(self, client: int, extra: Sequence[GaussianRound] = ()) -> float:
        """`client`'s epsilon so far, plus `extra` mechanisms (to test a round before it runs)."""
        history = list(self._rounds.get(client, []))
        for mechanism in extra:
            _append(history, mechanism)
        return _cached_epsilon(tuple(history), self.delta, self.accountant, self.neighbours)

    def would_exceed(self, max_epsilon: float, planned: dict[int, GaussianRound]) -> bool:
        """Whether running `planned` (client -> mechanism) takes any client past `max_epsilon`."""
        return any(self.epsilon_of(c, [m]) > max_epsilon for c, m in planned.items())

    def report(self) -> PrivacyReport | None:
        """The epsilon of the run (the worst client's) with its context, or None if nothing ran."""
        if not self._rounds:
            return None
        per_client = {c: self.epsilon_of(c) for c in sorted(self._rounds)}
        worst = max(per_client.values())
        distinct = len({round(v, 9) for v in per_client.values()}) > 1
        return PrivacyReport(
            epsilon=worst,
            delta=self.delta,
            level=self.level,
            accountant=self.accountant,
            neighbours=self.neighbours,
            per_client=per_client if distinct else {},
        )


def full_participation_warning(
    clients: int, noise_multiplier: float, rounds: int, delta: float
) -> str | None:
    """A plain warning when every client takes part in every round (no amplification).

    Example:
        >>> warning = full_participation_warning(10, 1.0, 100, 1e-3)
        >>> "all 100 rounds" in warning and "epsilon is 85.2 at delta 0.001" in warning
        True
    """
    if clients <= 0 or rounds <= 0:
        return None
    value = epsilon([GaussianRound(noise_multiplier, sampling="all", count=rounds)], delta)
    if value < 10:
        return None
    return (
        f"every one of the {clients} clients takes part in all {rounds} rounds, so sampling "
        f"amplifies nothing: with noise multiplier {noise_multiplier} the client-level "
        f"epsilon is {value:.1f} at delta {delta:g}"
    )
