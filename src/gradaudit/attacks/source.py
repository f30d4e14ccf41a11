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
from torch.func import functional_call, grad, vmap

from gradaudit.attacks.base import Infers, ProgressFn, Question
from gradaudit.types import ClientUpdate, Observation, TensorDict

CHUNK = 512
"""Records per forward pass (bounds memory on large candidate sets)."""

Signal = Literal["auto", "loss_drop", "gradient_alignment"]


# --------------------------------------------------------------------------- shared helpers


def candidate_records(obs: Observation) -> tuple[Tensor, Tensor] | None:
    """The records the adversary must decide about, from ``side_info["candidates"]``."""
    entry = obs.side_info.get("candidates")
    if not isinstance(entry, Mapping) or "x" not in entry or "y" not in entry:
        return None
    return entry["x"], entry["y"]  # type: ignore[return-value]


def granted_lr(obs: Observation) -> float | None:
    """The clients' local learning rate, when the threat model grants the hyperparameters."""
    hyper = obs.side_info.get("local_hyperparameters")
    if isinstance(hyper, Mapping) and hyper.get("lr"):
        return float(hyper["lr"])
    return None


def rounds_of(obs: Observation) -> tuple[Observation, ...]:
    """Every round the adversary saw, oldest first (`obs` alone when it has no history)."""
    return obs.history or (obs,)


def individual_updates(view: Observation) -> list[ClientUpdate]:
    """The individual updates of one round that carry information (real clients, ≥ 1 example)."""
    return [u for u in view.updates if u.client_id >= 0 and u.num_examples > 0]


def local_state(
    model: nn.Module, global_params: TensorDict, update: ClientUpdate, lr: float | None
) -> TensorDict | None:
    """The client's model after local training, as the server can rebuild it from the update.

    FedAvg: the global model plus the client's change. FedSGD: one SGD step of the granted
    learning rate along the client's gradient (None when the rate is unknown). Buffers always
    travel as their change, so they are added in both cases. Withheld tensors keep the global
    values: the server never saw the client's.
    """
    if update.kind == "gradient" and lr is None:
        return None
    parameters = {name for name, _ in model.named_parameters()}
    sent = set(update.sent_keys)
    state: TensorDict = {}
    for key, value in global_params.items():
        change = update.tensors.get(key)
        if change is None or key not in sent:
            state[key] = value
        elif update.kind == "gradient" and key in parameters:
            state[key] = value - lr * change  # type: ignore[operator]
        else:
            state[key] = value + change.to(value.dtype)
    return state


def record_losses(model: nn.Module, state: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    """Each record's cross-entropy under `state`, float64 (eval mode, no gradient)."""
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), CHUNK):
            logits = functional_call(model, state, (x[start : start + CHUNK],)).double()
            target = y[start : start + CHUNK]
            out.append(nn.functional.cross_entropy(logits, target, reduction="none"))
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def gradient_alignment(
    model: nn.Module, state: TensorDict, x: Tensor, y: Tensor, update: ClientUpdate
) -> Tensor:
    """Each record's first-order loss drop per unit learning rate, ``<grad l(x; theta), g>``.

    A step ``theta - lr * g`` changes the record's loss by ``-lr * <grad l, g>`` to first order,
    so this ranks clients as :func:`loss_drops` would when the learning rate is unknown. ``g``
    is the client's gradient, or minus its FedAvg change; only the tensors it sent count.
    Per-record gradients come from ``torch.func`` (vmap over grad), float64 result.
    """
    parameters = dict(model.named_parameters())
    keys = [k for k in update.sent_keys if k in parameters]
    sign = 1.0 if update.kind == "gradient" else -1.0
    direction = {k: sign * update.tensors[k] for k in keys}
    params = {k: state[k].detach() for k in keys}
    rest = {k: v for k, v in state.items() if k not in params}

    def loss(p: TensorDict, xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, (p, rest), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    if not keys:
        raise ValueError("the update carries none of the model's parameters")
    per_record = vmap(grad(loss), in_dims=(None, 0, 0))
    was = model.training
    model.eval()
    out = []
    for start in range(0, len(x), CHUNK):
        g = per_record(params, x[start : start + CHUNK], y[start : start + CHUNK])
        dots = torch.zeros(len(g[keys[0]]), dtype=torch.float64)
        for k in keys:
            dots += g[k].flatten(1).double() @ direction[k].flatten().double()
        out.append(dots)
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


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
    state = local_state(model, view.global_params, update, lr)
    if state is None:
        raise ValueError("a FedSGD client's local model needs the granted learning rate")
    if base is None:
        base = record_losses(model, view.global_params, x, y)
    return base - record_losses(model, state, x, y)


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
        if candidate_records(obs) is None:
            return "no candidate records were given (side_info['candidates'])"
        if not obs.side_info.get("architecture"):
            return "the adversary does not know the model architecture"
        rounds = rounds_of(obs)
        if not any(individual_updates(r) for r in rounds):
            if any(r.aggregate is not None for r in rounds):
                return (
                    "source inference compares the clients' individual updates; the server "
                    "sees only their aggregate"
                )
            return "the server saw no client update"
        if self.params.signal == "loss_drop" and granted_lr(obs) is None:
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
        x, y = candidate_records(obs)  # type: ignore[misc]
        num_clients = self._num_clients(obs)
        drops = torch.zeros(len(y), num_clients, dtype=torch.float64)
        seen = torch.zeros(num_clients, dtype=torch.int64)
        rounds = rounds_of(obs)
        lr = granted_lr(obs)  # the federation's one local learning rate
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
