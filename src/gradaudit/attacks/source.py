"""Source inference: which client's training data holds a given record (Hu et al. 2021).

Hu, Salcic, Sun, Dobbie and Zhang, "Source Inference Attacks in Federated Learning", IEEE ICDM
2021: an honest-but-curious server that knows a training record asks which client owns it. Under
their Bayesian analysis the posterior of client k being the source is a softmax over the
clients of minus the record's loss under each client's local model, so the optimal attack picks
the client whose local model fits the record best.

The helpers here (:func:`local_state`, :func:`record_losses`, :func:`loss_drops`,
:func:`gradient_alignment`) are shared with the attribute attack: every signal of both attacks
is a record's loss change between the round's global model and a client's local model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.attacks.base import Infers, ProgressFn, Question
from gradaudit.attacks.signals import (
    candidates,
    gradient_alignment,
    individual_updates,
    local_lr,
    loss_drop,
    record_losses,
    rounds_of,
    unanswerable,
)
from gradaudit.types import ClientUpdate, Observation

Signal = Literal["auto", "loss_drop", "gradient_alignment"]


def resolve_signal(signal: Signal, update: ClientUpdate, lr: float | None) -> str:
    """``loss_drop`` where the client's local model can be rebuilt, else ``gradient_alignment``."""
    if signal != "auto":
        return signal
    return "gradient_alignment" if update.kind == "gradient" and lr is None else "loss_drop"


def loss_change(
    model: nn.Module,
    view: Observation,
    update: ClientUpdate,
    x: Tensor,
    y: Tensor,
    *,
    signal: str,
    lr: float | None,
    base: Tensor | None = None,
) -> Tensor:
    """How much the client's update lowered each record's loss in the round of `view`.

    ``loss_drop``: loss under the round's global model minus loss under the client's local
    model (`lr`: the granted learning rate, needed for FedSGD; `base` may pass the first term
    in, computed once per round). ``gradient_alignment``: the first-order drop per unit
    learning rate (:func:`gradient_alignment`).
    """
    if signal == "gradient_alignment":
        return gradient_alignment(model, view.global_params, x, y, update)
    drop = loss_drop(model, view.global_params, update, x, y, lr, base=base)
    if drop is None:
        raise ValueError("a FedSGD client's local model needs the granted learning rate")
    return drop


# --------------------------------------------------------------------------- the attack


class SourceInferenceParams(BaseModel):
    """Parameters of ``source_inference``.

    Attributes:
        signal: ``loss_drop``: a record's loss under the round's global model minus under the
            client's local model (Hu et al.'s posterior within a round, where the global loss
            cancels); ``gradient_alignment``: its first-order version, for FedSGD gradients
            without the granted learning rate; ``auto``: ``loss_drop`` where the local model can
            be rebuilt, else ``gradient_alignment``.
        temperature: the posterior is ``softmax(mean drop / temperature)`` over clients (Hu et
            al.'s is temperature 1 on the loss); it changes the confidence, never the answer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    signal: Signal = "auto"
    temperature: float = Field(1.0, gt=0)


def combine_rounds(drops: Tensor, seen: Tensor, temperature: float) -> Tensor:
    """The log-posterior (N, K) over clients from summed per-round drops.

    Args:
        drops: (N, K) each record's loss drop summed over the rounds each client took part in.
        seen: (K,) in how many rounds each client's update was seen.
        temperature: divides the mean drop before the softmax.

    A client never seen gives no evidence: its mean drop is set to the lowest seen client's for
    that record, so it is never preferred to a client whose model was observed.

    Example:
        >>> s = combine_rounds(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([2, 1, 0]), 1.0)
        >>> s.argmax(1).tolist(), s.exp().sum().item()
        ([0], 1.0)
    """
    drops = drops.double()
    observed = seen > 0
    if not bool(observed.any()):
        return torch.full_like(drops, -math.log(drops.shape[1]))
    mean = drops / seen.clamp_min(1).double()
    floor = mean[:, observed].min(dim=1, keepdim=True).values
    mean = torch.where(observed.unsqueeze(0), mean, floor)
    return torch.log_softmax(mean / temperature, dim=1)


class SourceInferenceAttack(Infers):
    """Which client holds each candidate record: the client whose local models lower its loss
    most (Hu et al., "Source Inference Attacks in Federated Learning", ICDM 2021).

    Threat model: an honest-but-curious server that sees every client's individual update in
    the rounds it observes and knows the architecture; the candidate records are given. In each
    round the server rebuilds each participating client's local model (global + change, or one
    SGD step for FedSGD with the granted learning rate) and computes each record's loss drop;
    drops are averaged over the rounds each client took part in, and the scores are the
    log-posterior ``log_softmax(mean drop)`` over clients (Hu et al.'s Bayes-optimal rule, with
    the global model's loss, equal for every client within a round, subtracted so rounds compare).
    """

    name: ClassVar[str] = "source_inference"
    question: ClassVar[Question | None] = "source"
    needs_history: ClassVar[bool] = True

    def __init__(self, params: SourceInferenceParams | None = None) -> None:
        self.params = params or SourceInferenceParams()

    def applicable(self, obs: Observation) -> str | None:
        """None when candidates, the architecture and some individual update are at hand."""
        reason = unanswerable(obs)
        if reason is not None:
            return reason
        rounds = rounds_of(obs)
        if not any(individual_updates(r) for r in rounds):
            if any(r.aggregate is not None for r in rounds):
                return (
                    "source inference compares the clients' individual updates; the server "
                    "sees only their aggregate"
                )
            return "the server saw no client update"
        if self.params.signal == "loss_drop" and local_lr(obs) is None:
            kinds = {u.kind for r in rounds for u in individual_updates(r)}
            if kinds == {"gradient"}:
                return (
                    "signal loss_drop rebuilds FedSGD clients' local models, which needs the "
                    "local learning rate (grant local_hyperparameters, or use signal auto)"
                )
        return None

    def infer(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None,
    ) -> tuple[Tensor, dict[str, object]]:
        """Score every candidate record against every client (deterministic: `rng` is unused)."""
        x, y = candidates(obs)  # type: ignore[misc]
        num_clients = self._num_clients(obs)
        drops = torch.zeros(len(y), num_clients, dtype=torch.float64)
        seen = torch.zeros(num_clients, dtype=torch.int64)
        rounds = rounds_of(obs)
        lr = local_lr(obs)  # the federation's one local learning rate
        signals: set[str] = set()
        used_rounds: list[int] = []
        for done, view in enumerate(rounds, start=1):
            updates = [u for u in individual_updates(view) if u.client_id < num_clients]
            base = None
            for update in updates:
                signal = resolve_signal(self.params.signal, update, lr)
                if signal == "loss_drop" and base is None:
                    base = record_losses(model, view.global_params, x, y)
                change = loss_change(model, view, update, x, y, signal=signal, lr=lr, base=base)
                drops[:, update.client_id] += change
                seen[update.client_id] += 1
                signals.add(signal)
            if updates:
                used_rounds.append(view.round)
            if progress is not None:
                progress(done, len(rounds))
        scores = combine_rounds(drops, seen, self.params.temperature)
        return scores, {
            "method": "Hu et al. 2021: log-posterior over clients of the record's mean loss "
            "drop under each client's local model",
            "signal": sorted(signals),
            "rounds": used_rounds,
            "updates_seen_per_client": seen.tolist(),
            "clients_never_seen": int((seen == 0).sum()),
            "temperature": self.params.temperature,
        }

    @staticmethod
    def _num_clients(obs: Observation) -> int:
        """K: the challenge's client count, else one more than the largest client id seen."""
        entry = obs.side_info.get("candidates")
        if isinstance(entry, Mapping) and entry.get("num_clients"):
            return int(entry["num_clients"])  # type: ignore[arg-type]
        ids = [u.client_id for r in rounds_of(obs) for u in individual_updates(r)]
        return max(ids) + 1
