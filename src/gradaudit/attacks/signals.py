"""Per-record signals inference attacks compute from a model and the updates the server saw.

All losses and cosines are float64: float32 cross-entropies of well-fitted records round to the
same value near zero, and the low-FPR end of a ROC is exactly where those records sit.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gradaudit.defenses.dp import per_example_gradients
from gradaudit.types import ClientUpdate, Observation, TensorDict

CHUNK = 512
"""Candidates per forward pass (bounds memory on large candidate sets)."""


def candidates(obs: Observation) -> tuple[Tensor, Tensor] | None:
    """The records the adversary must decide about, from ``side_info["candidates"]``."""
    entry = obs.side_info.get("candidates")
    if not isinstance(entry, Mapping) or "x" not in entry or "y" not in entry:
        return None
    return entry["x"], entry["y"]  # type: ignore[return-value]


def unanswerable(obs: Observation) -> str | None:
    """Why an attack on the candidate records cannot start (none were given, or the adversary
    does not know the architecture), or None."""
    if candidates(obs) is None:
        return "no candidate records were given (side_info['candidates'])"
    if not obs.side_info.get("architecture"):
        return "the adversary does not know the model architecture"
    return None


def local_lr(obs: Observation) -> float | None:
    """The clients' local learning rate, when the threat model grants the hyperparameters."""
    hyper = obs.side_info.get("local_hyperparameters")
    if isinstance(hyper, Mapping) and hyper.get("lr"):
        return float(hyper["lr"])
    return None


def local_state(
    model: nn.Module | None, global_params: TensorDict, update: ClientUpdate, lr: float | None
) -> TensorDict | None:
    """The client's model after local training, as the server can rebuild it from the update.

    FedAvg: the global model plus the client's change. FedSGD: one SGD step of the granted
    learning rate along the client's gradient (None when the rate is unknown). Buffers always
    travel as their change, so they are added in both cases (`model` tells parameters from
    buffers; None treats every tensor as a parameter). Withheld tensors keep the global
    values: the server never saw the client's.

    Example:
        >>> up = ClientUpdate(0, 1, "gradient", {"w": torch.tensor([2.0])}, 1)
        >>> local_state(None, {"w": torch.tensor([1.0])}, up, 0.5)["w"].tolist()
        [0.0]
    """
    if update.kind == "gradient" and lr is None:
        return None
    parameters = (
        {name for name, _ in model.named_parameters()} if model is not None else set(global_params)
    )
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


def rounds_of(obs: Observation) -> tuple[Observation, ...]:
    """Every round the adversary saw, oldest first (`obs` alone when it has no history)."""
    return obs.history or (obs,)


def individual_updates(view: Observation) -> list[ClientUpdate]:
    """The individual updates of one round that carry information (real clients, ≥ 1 example)."""
    return [u for u in view.updates if u.client_id >= 0 and u.num_examples > 0]


def record_losses(model: nn.Module, state: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    """Each record's cross-entropy under `state`, in float64 (eval mode, no gradient)."""
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), CHUNK):
            logits = functional_call(model, state, (x[start : start + CHUNK],)).double()
            out.append(
                nn.functional.cross_entropy(logits, y[start : start + CHUNK], reduction="none")
            )
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def loss_drop(
    model: nn.Module,
    global_params: TensorDict,
    update: ClientUpdate,
    x: Tensor,
    y: Tensor,
    lr: float | None,
    *,
    base: Tensor | None = None,
) -> Tensor | None:
    """Each record's loss under the global model minus under the client's local model
    (float64; `base` may pass the first term in, computed once per round), or None when the
    local model cannot be formed (a FedSGD gradient without the learning rate)."""
    state = local_state(model, global_params, update, lr)
    if state is None:
        return None
    if base is None:
        base = record_losses(model, global_params, x, y)
    return base - record_losses(model, state, x, y)


def gradient_signals(
    model: nn.Module,
    state: TensorDict,
    x: Tensor,
    y: Tensor,
    keys: list[str],
    direction: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Each record's loss-gradient norm over the parameters `keys`, and its cosine with
    `direction` (a flat vector over the same keys), both float64.

    Per-example gradients (:func:`gradaudit.defenses.dp.per_example_gradients`) in eval mode,
    a chunk at a time so that no (N, P) matrix is kept.
    """
    was = model.training
    model.eval()
    norms, cos = [], []
    for start in range(0, len(x), CHUNK):
        g = per_example_gradients(
            model, x[start : start + CHUNK], y[start : start + CHUNK], state=state
        )
        rows = torch.cat([g[k].flatten(1) for k in keys], dim=1).double()
        norms.append(rows.norm(dim=1))
        if direction is not None:
            cos.append(cosines(rows, direction))
    model.train(was)
    empty = torch.zeros(0, dtype=torch.float64)
    return (
        torch.cat(norms) if norms else empty,
        (torch.cat(cos) if cos else empty) if direction is not None else None,
    )


def gradient_alignment(
    model: nn.Module, state: TensorDict, x: Tensor, y: Tensor, update: ClientUpdate
) -> Tensor:
    """Each record's first-order loss drop per unit learning rate, ``<grad l(x; theta), g>``.

    A step ``theta - lr * g`` changes the record's loss by ``-lr * <grad l, g>`` to first order,
    so this ranks clients as :func:`loss_drops` would when the learning rate is unknown. ``g``
    is the client's gradient, or minus its FedAvg change; only the tensors it sent count.
    Per-record gradients from :func:`gradaudit.defenses.dp.per_example_gradients`, float64
    result.
    """
    parameters = dict(model.named_parameters())
    keys = [k for k in update.sent_keys if k in parameters]
    sign = 1.0 if update.kind == "gradient" else -1.0
    direction = {k: sign * update.tensors[k] for k in keys}
    if not keys:
        raise ValueError("the update carries none of the model's parameters")
    was = model.training
    model.eval()
    out = []
    for start in range(0, len(x), CHUNK):
        g = per_example_gradients(
            model, x[start : start + CHUNK], y[start : start + CHUNK], state=state
        )
        dots = torch.zeros(len(g[keys[0]]), dtype=torch.float64)
        for k in keys:
            dots += g[k].flatten(1).double() @ direction[k].flatten().double()
        out.append(dots)
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def flat(tensors: TensorDict, keys: list[str]) -> Tensor:
    """The tensors at `keys`, flattened into one float64 vector."""
    return torch.cat([tensors[k].flatten() for k in keys]).double()


def cosines(rows: Tensor, direction: Tensor) -> Tensor:
    """Cosine of each row with `direction` (0 where either is zero)."""
    norms = rows.norm(dim=1) * direction.norm()
    dots = rows @ direction
    return torch.where(norms > 0, dots / norms.clamp_min(1e-300), torch.zeros_like(dots))
