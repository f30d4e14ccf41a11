"""What a client-side defense is, and what the round loop lets it touch.

A client defense is mostly an :class:`UpdateTransform` (DESIGN.md section 5): the client applies
it to its update before sending. Some defenses need more than the finished update, so
:class:`ClientDefense` offers a few optional hooks, each a no-op by default:

- :meth:`ClientDefense.transform` changes the update (clipping, sparsifying, quantising, noise);
  it may read the client's own batch (:class:`LocalData`), which never leaves the client.
- :meth:`ClientDefense.local_training` changes how the client trains: DP-SGD inside the client
  (:class:`DpSgd`), Poisson-sampled local batches, or a context manager around the client's
  training (a random sub-model, a private head). A context forces the loop engine.
- :meth:`ClientDefense.admits` lets a client refuse a round (a participation budget).
- :meth:`ClientDefense.aggregate` and :meth:`ClientDefense.end_round` are the server's half of
  a defense that has one (DP-FedAvg adds noise to the sum and adapts its clip norm);
  :meth:`ClientDefense.summand` and :meth:`ClientDefense.from_sum` say the same as a sum, so the
  defense also runs under secure aggregation, where the server sees only the sum.
- :meth:`ClientDefense.stop_reason` ends training before a round (``max_epsilon``).
- :meth:`ClientDefense.describe` and :meth:`ClientDefense.privacy` feed the report. Every defense
  states its guarantee; only a mechanism with a DP proof and an accountant says more than
  ``none (heuristic)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from gradaudit.types import ClientUpdate, TaskInfo, TensorDict, tensor_bytes

if TYPE_CHECKING:
    from gradaudit.config import FederationSpec
    from gradaudit.defenses.accounting import PrivacyReport

HEURISTIC = "none (heuristic)"
"""The guarantee of a defense without a formal privacy proof."""


@dataclass(frozen=True)
class DefenseContext:
    """Public facts of the run a defense is built with (the server knows all of them).

    Attributes:
        model: the architecture (read its structure; do not train it).
        federation: the federation settings.
        client_sizes: training examples per client (one entry per client).
        task: public facts about the task.
        seed: the scenario seed.
    """

    model: nn.Module
    federation: FederationSpec
    client_sizes: tuple[int, ...]
    task: TaskInfo
    seed: int = 0

    @property
    def num_clients(self) -> int:
        """Clients in the federation."""
        return len(self.client_sizes)

    @property
    def param_names(self) -> frozenset[str]:
        """The trainable parameters' keys."""
        return frozenset(name for name, _ in self.model.named_parameters())

    @property
    def expected_clients(self) -> float:
        """Clients expected to take part in a round (before dropouts)."""
        fed = self.federation
        if fed.clients_per_round is not None:
            return float(fed.clients_per_round)
        if fed.sample_rate is not None:
            return fed.sample_rate * self.num_clients
        return float(self.num_clients)


@dataclass(frozen=True)
class LocalData:
    """The client's own view while it defends its update: never sent, never seen by attacks.

    The examples are gathered only when a defense reads them (most never do), so the round loop
    pays nothing for this view when no defense looks at the data.

    Attributes:
        model: the architecture (a scratch copy the defense may load states into).
        global_state: the model the server sent this round.
        x_all: the whole training set (model space); ``x`` is the client's part of it.
        y_all: its labels.
        used: indices into ``x_all`` of the examples the client trained on this round (None:
            all of them).
    """

    model: nn.Module
    global_state: TensorDict
    x_all: Tensor
    y_all: Tensor
    used: Tensor | None = None

    @property
    def x(self) -> Tensor:
        """The examples the client trained on this round (model space)."""
        return self.x_all if self.used is None else self.x_all[self.used]

    @property
    def y(self) -> Tensor:
        """Their labels."""
        return self.y_all if self.used is None else self.y_all[self.used]


@dataclass(frozen=True)
class DpSgd:
    """DP-SGD inside a client (Abadi et al. 2016): clip each example's gradient, add noise.

    Attributes:
        clip_norm: the per-example L2 bound.
        noise_multiplier: noise std over `clip_norm` for this client.
        expected_batch_size: the Poisson-sampled batch's expected size (the noisy sum's divisor).
    """

    clip_norm: float
    noise_multiplier: float
    expected_batch_size: float


@dataclass(frozen=True)
class LocalTraining:
    """How one client's local training departs from plain SGD this round.

    Attributes:
        dp_sgd: per-example clipping and noise at every local step.
        poisson_batches: each local batch includes each example independently with probability
            ``batch_size / n`` (the sampling DP-SGD's accounting assumes), rather than shuffling.
        context: entered around the client's local steps with the model holding the global
            state, exited with the model holding the trained state (the loop engine only).
    """

    dp_sgd: DpSgd | None = None
    poisson_batches: bool = False
    context: Callable[[nn.Module], AbstractContextManager[None]] | None = None


@dataclass(frozen=True)
class RoundInfo:
    """What the server knows about the round when it aggregates.

    Attributes:
        round: the round (from 1).
        sampled: the clients asked to train (those whose update arrived are the updates').
    """

    round: int
    sampled: tuple[int, ...]


class ClientDefense:
    """Base of client-side defenses: every hook is a no-op until a subclass overrides it.

    Attributes:
        name: the registry name.
        guarantee: the formal guarantee in words, or :data:`HEURISTIC`.
    """

    name: ClassVar[str] = "defense"
    guarantee: str = HEURISTIC

    def transform(
        self, update: ClientUpdate, *, rng: torch.Generator, local: LocalData
    ) -> ClientUpdate:
        """The update the client sends instead of `update` (a new object; inputs untouched)."""
        return update

    def local_training(self, client: int, rnd: int) -> LocalTraining | None:
        """How `client` trains in round `rnd`, if this defense changes it."""
        return None

    @property
    def needs_loop_engine(self) -> bool:
        """Whether local training needs per-client hooks the vectorised engine cannot run."""
        return False

    def admits(self, client: int, rnd: int) -> bool:
        """Whether `client` takes part in round `rnd` when sampled (False: it stays silent)."""
        return True

    def stop_reason(self, rnd: int, sampled: Sequence[int]) -> str | None:
        """A sentence when training must stop before round `rnd` runs, else None."""
        return None

    def aggregate(
        self, updates: Sequence[ClientUpdate], info: RoundInfo, *, rng: torch.Generator
    ) -> TensorDict | None:
        """The server's aggregate when this defense prescribes it, else None (plain FedAvg)."""
        return None

    def summand(self, update: ClientUpdate) -> tuple[TensorDict, dict[str, int]] | None:
        """Client side of a secure sum: the tensors and integer statistics this client adds
        to the sum, when this defense prescribes the aggregate; None keeps FedAvg weighting.

        :meth:`from_sum` must turn the sum of summands into the aggregate, so that under an
        aggregation protocol (``defenses.server``) the server never needs an individual update.
        """
        return None

    def from_sum(
        self,
        total: TensorDict,
        counts: Mapping[str, int],
        info: RoundInfo,
        *,
        rng: torch.Generator,
    ) -> TensorDict | None:
        """Server side of a secure sum: the aggregate from the summands' float64 sum and their
        summed statistics (None when this defense has no summand)."""
        return None

    def end_round(self, updates: Sequence[ClientUpdate], info: RoundInfo) -> None:
        """Bookkeeping after the round's aggregate was applied (accounting, adaptation)."""

    def evaluation_states(self, global_state: TensorDict) -> list[TensorDict] | None:
        """The models to evaluate instead of the global one (personalised parts), or None."""
        return None

    def privacy(self) -> PrivacyReport | None:
        """The accountant's epsilon for what ran, when this defense is a DP mechanism."""
        return None

    def describe(self) -> dict[str, Any]:
        """The report's entry: name, guarantee, parameters and anything the user must know."""
        return self.entry([], [])

    def entry(self, notes: list[str], warnings: list[str], **extra: Any) -> dict[str, Any]:
        """The report entry every `describe` returns: kind, guarantee, params, notes, warnings.

        ``params`` is the defense's validated ``params`` (when it has one) unless `extra`
        gives it; further `extra` keys are added as they are.
        """
        params = getattr(self, "params", None)
        return {
            "kind": self.name,
            "guarantee": self.guarantee,
            "params": params.model_dump(mode="json") if isinstance(params, BaseModel) else {},
            "notes": notes,
            "warnings": warnings,
            **extra,
        }


@dataclass(frozen=True)
class DefenseStack:
    """The client defenses of a scenario, in order, with the checks on how they combine."""

    defenses: tuple[ClientDefense, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        servers = [
            d.name
            for d in self.defenses
            if type(d).aggregate is not ClientDefense.aggregate
            or type(d).from_sum is not ClientDefense.from_sum
        ]
        if len(servers) > 1:
            raise ValueError(
                f"defenses {servers} each prescribe the server's aggregate; use only one of them"
            )
        trainers = [
            d.name
            for d in self.defenses
            if type(d).local_training is not ClientDefense.local_training
        ]
        if len(trainers) > 1:
            raise ValueError(
                f"defenses {trainers} each change local training; use only one of them"
            )

    @property
    def needs_loop_engine(self) -> bool:
        """Whether some defense's training hook needs the loop engine."""
        return any(d.needs_loop_engine for d in self.defenses)

    def local_training(self, client: int, rnd: int) -> LocalTraining | None:
        """The one training change of this round for `client`, if any."""
        for defense in self.defenses:
            rule = defense.local_training(client, rnd)
            if rule is not None:
                return rule
        return None

    def admits(self, client: int, rnd: int) -> bool:
        """Whether every defense lets `client` take part."""
        return all(d.admits(client, rnd) for d in self.defenses)

    def stop_reason(self, rnd: int, sampled: Sequence[int]) -> str | None:
        """The first defense's reason to stop before round `rnd`."""
        for defense in self.defenses:
            reason = defense.stop_reason(rnd, sampled)
            if reason is not None:
                return reason
        return None

    def transform(
        self,
        update: ClientUpdate,
        *,
        rng_for: Callable[[int], torch.Generator],
        local: LocalData,
    ) -> ClientUpdate:
        """`update` after every defense in order; defense i draws from ``rng_for(i)``."""
        for i, defense in enumerate(self.defenses):
            update = defense.transform(update, rng=rng_for(i), local=local)
        return update

    def aggregate(
        self, updates: Sequence[ClientUpdate], info: RoundInfo, *, rng: torch.Generator
    ) -> TensorDict | None:
        """The aggregate one defense prescribes, else None."""
        for defense in self.defenses:
            result = defense.aggregate(updates, info, rng=rng)
            if result is not None:
                return result
        return None

    def summand(
        self, update: ClientUpdate, *, weight_unit: float
    ) -> tuple[TensorDict, dict[str, int]]:
        """What `update`'s client adds to a secure sum: a defense's summand, else the FedAvg
        summand (the sent tensors times ``num_examples / weight_unit``, and the example
        count), whose sum :meth:`from_sum` divides by the summed count."""
        for defense in self.defenses:
            result = defense.summand(update)
            if result is not None:
                return result
        weight = update.num_examples / weight_unit
        tensors = {k: update.tensors[k].to(torch.float64) * weight for k in update.sent_keys}
        return tensors, {"examples": int(update.num_examples)}

    def from_sum(
        self,
        total: TensorDict,
        counts: Mapping[str, int],
        info: RoundInfo,
        *,
        rng: torch.Generator,
        template: TensorDict,
        weight_unit: float,
    ) -> TensorDict:
        """The aggregate from a secure sum of :meth:`summand` values, keyed and typed like
        `template` (tensors nobody sent stay zero; integer tensors are rounded)."""
        for defense in self.defenses:
            result = defense.from_sum(total, counts, info, rng=rng)
            if result is not None:
                return result
        examples = counts.get("examples", 0)
        out: TensorDict = {}
        for key, like in template.items():
            if key not in total or examples == 0:
                out[key] = torch.zeros_like(like)
                continue
            mean = total[key] * (weight_unit / examples)
            out[key] = (
                mean.round().to(like.dtype) if not like.is_floating_point() else mean.to(like.dtype)
            )
        return out

    def end_round(self, updates: Sequence[ClientUpdate], info: RoundInfo) -> None:
        """Let every defense do its bookkeeping."""
        for defense in self.defenses:
            defense.end_round(updates, info)

    def evaluation_states(self, global_state: TensorDict) -> list[TensorDict] | None:
        """The personalised models one defense asks to evaluate, else None."""
        for defense in self.defenses:
            states = defense.evaluation_states(global_state)
            if states is not None:
                return states
        return None


def with_tensors(
    update: ClientUpdate,
    tensors: Mapping[str, Tensor],
    *,
    withheld: frozenset[str] | None = None,
    wire_bytes: int | None = None,
) -> ClientUpdate:
    """A copy of `update` carrying `tensors` (and, when given, its withheld keys and size)."""
    changes: dict[str, Any] = {"tensors": dict(tensors)}
    if withheld is not None:
        changes["withheld"] = withheld
    if wire_bytes is not None:
        changes["wire_bytes"] = wire_bytes
    return replace(update, **changes)


def encode_each(
    update: ClientUpdate,
    keys: Sequence[str],
    encode: Callable[[str, Tensor], tuple[Tensor, int]],
) -> ClientUpdate:
    """`update` with ``encode(key, tensor)`` applied to each tensor of `keys`; ``wire_bytes``
    counts what ``encode`` says each encoded tensor costs, plus every other sent tensor
    uncompressed.

    Returns `update` itself when `keys` is empty (nothing to encode).
    """
    if not keys:
        return update
    tensors = dict(update.tensors)
    wire = tensor_bytes({k: v for k, v in update.tensors.items() if k in update.sent_keys})
    for key in keys:
        tensors[key], size = encode(key, update.tensors[key])
        wire += size - tensor_bytes({key: update.tensors[key]})
    return with_tensors(update, tensors, wire_bytes=wire)


def float_keys(update: ClientUpdate) -> list[str]:
    """The sent floating-point tensors of an update (what numeric defenses act on)."""
    return [
        k for k, v in update.tensors.items() if v.is_floating_point() and k not in update.withheld
    ]
