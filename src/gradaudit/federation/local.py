"""Client-side local training: which examples each local step uses, and the two engines."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradaudit.defenses.dp import clip_factors, dp_sgd_gradient, noised_mean
from gradaudit.types import TensorDict

if TYPE_CHECKING:
    from gradaudit.defenses.base import DpSgd, LocalTraining

logger = logging.getLogger(__name__)

Algorithm = Literal["fedsgd", "fedavg"]


@dataclass(frozen=True)
class LocalPlan:
    """The examples one client uses at each local step (indices into the training set).

    Attributes:
        client_id: the client.
        steps: one index array per local SGD step (FedSGD has exactly one).
    """

    client_id: int
    steps: tuple[np.ndarray, ...]

    @property
    def used(self) -> np.ndarray:
        """Every example the client touched, once each, sorted."""
        return np.unique(np.concatenate(self.steps)) if self.steps else np.zeros(0, np.int64)

    @property
    def num_examples(self) -> int:
        """The example count the client reports to the server for weighting."""
        return int(self.used.size)


def plan_local_batches(
    client_id: int,
    indices: np.ndarray,
    *,
    algorithm: Algorithm,
    batch_size: int,
    epochs: int | None,
    steps: int | None,
    rng: np.random.Generator,
    poisson: bool = False,
) -> LocalPlan:
    """Draw the local batches of one client for one round.

    FedSGD takes one batch of ``min(batch_size, n)`` examples without replacement. FedAvg shuffles
    the client's data each epoch and cuts it into batches (the last may be smaller); with `steps`
    it keeps going through fresh shuffles until exactly `steps` batches are drawn.

    With `poisson` (DP-SGD's sampling) every batch includes each example independently with
    probability ``min(1, batch_size / n)``, so batch sizes vary and may be zero; FedAvg then
    takes `steps` batches, or ``epochs * ceil(n / batch_size)``.

    Example:
        >>> plan = plan_local_batches(0, np.arange(10), algorithm="fedavg", batch_size=4,
        ...                           epochs=1, steps=None, rng=np.random.default_rng(0))
        >>> [len(s) for s in plan.steps]
        [4, 4, 2]
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        return LocalPlan(client_id, ())
    if poisson:
        rate = min(1.0, batch_size / indices.size)
        if algorithm == "fedsgd":
            count = 1
        elif steps is not None:
            count = steps
        else:
            count = (epochs or 1) * -(-indices.size // batch_size)
        return LocalPlan(
            client_id,
            tuple(indices[rng.random(indices.size) < rate] for _ in range(count)),
        )
    if algorithm == "fedsgd":
        take = min(batch_size, indices.size)
        return LocalPlan(client_id, (np.sort(rng.choice(indices, size=take, replace=False)),))
    batches: list[np.ndarray] = []
    wanted_epochs = epochs if epochs is not None else (None if steps is not None else 1)
    epoch = 0
    while True:
        order = rng.permutation(indices)
        for start in range(0, order.size, batch_size):
            batches.append(order[start : start + batch_size])
            if steps is not None and len(batches) == steps:
                return LocalPlan(client_id, tuple(batches))
        epoch += 1
        if wanted_epochs is not None and epoch >= wanted_epochs:
            return LocalPlan(client_id, tuple(batches))


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model keeps running statistics (which rules out the vectorised engine)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def set_client_mode(model: nn.Module, *, batchnorm: str) -> None:
    """Training mode for local steps; with ``batchnorm="frozen"`` BatchNorm layers run in eval
    mode (global running statistics, not updated)."""
    model.train()
    if batchnorm == "frozen":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _state_split(model: nn.Module, state: TensorDict) -> tuple[TensorDict, TensorDict]:
    param_names = {name for name, _ in model.named_parameters()}
    params = {k: v for k, v in state.items() if k in param_names}
    buffers = {k: v for k, v in state.items() if k not in param_names}
    return params, buffers


def _weighted_ce(logits: Tensor, y: Tensor, w: Tensor) -> Tensor:
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    return (losses * w).sum() / w.sum().clamp_min(1.0)


def train_clients_loop(
    model: nn.Module,
    global_state: TensorDict,
    x: Tensor,
    y: Tensor,
    plans: Sequence[LocalPlan],
    *,
    algorithm: Algorithm,
    lr: float,
    batchnorm: str = "train",
    rules: Sequence[LocalTraining | None] = (),
    generators: Sequence[torch.Generator] = (),
) -> list[TensorDict]:
    """Train each client in turn (plain PyTorch, works for every model, BatchNorm included).

    Args:
        rules: per plan, how a defense changes the client's training (DP-SGD, a context around
            its steps); empty or None means plain SGD.
        generators: per plan, the random stream of its DP-SGD noise (needed with `dp_sgd`).

    Returns, per client, the update tensors keyed like ``model.state_dict()``: the gradient
    (FedSGD) or the parameter change (FedAvg) for parameters, and the change of every buffer.
    The model is left holding `global_state`.
    """
    updates: list[TensorDict] = []
    names = [name for name, _ in model.named_parameters()]
    for i, plan in enumerate(plans):
        rule = rules[i] if rules else None
        model.load_state_dict(global_state)
        set_client_mode(model, batchnorm=batchnorm)
        context = rule.context(model) if rule is not None and rule.context else nullcontext()
        with context:
            last_grads = _client_steps(
                model,
                x,
                y,
                plan,
                algorithm=algorithm,
                lr=lr,
                dp=rule.dp_sgd if rule is not None else None,
                generator=generators[i] if generators else None,
            )
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        update: TensorDict = {}
        grads = dict(zip(names, last_grads, strict=True)) if last_grads else {}
        for key, value in state.items():
            if algorithm == "fedsgd" and key in grads:
                update[key] = grads[key].detach().clone()
            else:
                update[key] = value - global_state[key]
        updates.append(update)
    model.load_state_dict(global_state)
    return updates


def _client_steps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    plan: LocalPlan,
    *,
    algorithm: Algorithm,
    lr: float,
    dp: DpSgd | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, ...]:
    """Run one client's local steps in place on `model`; the last step's gradient."""
    params = [p for _, p in model.named_parameters()]
    last_grads: tuple[Tensor, ...] = ()
    for idx in plan.steps:
        index = torch.as_tensor(idx, dtype=torch.long)
        if dp is not None:
            if generator is None:
                raise ValueError("DP-SGD needs a generator for its noise")
            noisy = dp_sgd_gradient(
                model,
                x[index],
                y[index],
                clip_norm=dp.clip_norm,
                noise_multiplier=dp.noise_multiplier,
                expected_batch_size=dp.expected_batch_size,
                generator=generator,
            )
            last_grads = tuple(noisy[name] for name, _ in model.named_parameters())
        else:
            logits = model(x[index])
            loss = nn.functional.cross_entropy(logits, y[index])
            last_grads = torch.autograd.grad(loss, params)
        if algorithm == "fedavg":
            with torch.no_grad():
                for p, g in zip(params, last_grads, strict=True):
                    p.sub_(lr * g)
    return last_grads


def _pad_steps(
    plans: Sequence[LocalPlan],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack every client's step indices into (C, S, B) arrays with a weight mask."""
    num_steps = max((len(p.steps) for p in plans), default=0)
    width = max(max((len(s) for p in plans for s in p.steps), default=0), 1)
    index = np.zeros((len(plans), num_steps, width), dtype=np.int64)
    weight = np.zeros((len(plans), num_steps, width), dtype=np.float32)
    active = np.zeros((len(plans), num_steps), dtype=np.float32)
    for c, plan in enumerate(plans):
        for s, idx in enumerate(plan.steps):
            index[c, s, : len(idx)] = idx
            weight[c, s, : len(idx)] = 1.0
            active[c, s] = 1.0
    return index, weight, active


def _dp_sgd_step(
    model: nn.Module,
    buffers: TensorDict,
    stacked: TensorDict,
    xb: Tensor,
    yb: Tensor,
    weight: Tensor,
    active: Tensor,
    dps: Sequence[DpSgd],
    generators: Sequence[torch.Generator],
) -> TensorDict:
    """One DP-SGD gradient per client, all clients at once (padding examples weigh zero)."""

    def example_loss(p: TensorDict, xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(vmap(grad(example_loss), in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
    g = per_example(stacked, xb, yb)
    clip = torch.tensor([d.clip_norm for d in dps]).unsqueeze(1)
    factors, _ = clip_factors(g, clip, batch_dims=2)
    summed = {k: torch.einsum("cb,cb...->c...", factors * weight, v) for k, v in g.items()}
    for c, dp in enumerate(dps):
        if not active[c]:
            continue
        noised = noised_mean(
            {k: v[c] for k, v in summed.items()},
            std=dp.noise_multiplier * dp.clip_norm,
            expected_batch_size=dp.expected_batch_size,
            generator=generators[c],
        )
        for k, v in noised.items():
            summed[k][c] = v
    return summed


def train_clients_vectorised(
    model: nn.Module,
    global_state: TensorDict,
    x: Tensor,
    y: Tensor,
    plans: Sequence[LocalPlan],
    *,
    algorithm: Algorithm,
    lr: float,
    batchnorm: str = "train",
    rules: Sequence[LocalTraining | None] = (),
    generators: Sequence[torch.Generator] = (),
) -> list[TensorDict]:
    """Train all clients of a round together with ``torch.func`` (functional_call + vmap + grad).

    Numerically the same as :func:`train_clients_loop` (tested), for models without BatchNorm.
    Clients with fewer or smaller batches are padded with zero-weight examples and inactive steps.
    DP-SGD (`rules` with ``dp_sgd`` for every client, or for none) computes per-example gradients
    with a second ``vmap`` and draws each client's noise from its own generator in the loop
    engine's order, so both engines agree here too. Training contexts need the loop engine.
    """
    if any(r is not None and r.context is not None for r in rules):
        raise ValueError("a defense's training context needs the loop engine")
    dps = [r.dp_sgd if r is not None else None for r in rules] if rules else []
    if any(d is not None for d in dps) and not all(d is not None for d in dps):
        raise ValueError("DP-SGD must apply to every client of a round or to none")
    if has_batchnorm(model):
        raise ValueError("the vectorised engine needs a model without BatchNorm")
    params, buffers = _state_split(model, global_state)
    index_np, weight_np, active_np = _pad_steps(plans)
    num_clients, num_steps, _ = index_np.shape
    index = torch.as_tensor(index_np)
    weight = torch.as_tensor(weight_np)
    active = torch.as_tensor(active_np)

    def loss(p: TensorDict, xb: Tensor, yb: Tensor, wb: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (xb,))
        return _weighted_ce(logits, yb, wb)

    per_client_grad = vmap(grad(loss), in_dims=(0, 0, 0, 0))
    stacked = {k: v.unsqueeze(0).expand(num_clients, *v.shape).clone() for k, v in params.items()}
    last: TensorDict = {}
    model.train()
    for s in range(num_steps):
        idx = index[:, s]
        if dps and dps[0] is not None:
            g = _dp_sgd_step(
                model,
                buffers,
                stacked,
                x[idx],
                y[idx],
                weight[:, s],
                active[:, s],
                dps,
                generators,  # type: ignore[arg-type]
            )
        else:
            g = per_client_grad(stacked, x[idx], y[idx], weight[:, s])
        if algorithm == "fedsgd":
            last = g
            break
        mask = active[:, s]
        stacked = {
            k: v - lr * g[k] * mask.view(-1, *([1] * (v.dim() - 1))) for k, v in stacked.items()
        }
    updates: list[TensorDict] = []
    for c in range(num_clients):
        update: TensorDict = {}
        for key, value in global_state.items():
            if key in params:
                if algorithm == "fedsgd":
                    update[key] = last[key][c].detach().clone()
                else:
                    update[key] = (stacked[key][c] - value).detach().clone()
            else:
                update[key] = torch.zeros_like(value)
        updates.append(update)
    return updates
