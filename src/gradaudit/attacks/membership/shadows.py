"""Shadow models for membership inference, all trained together in one vectorised pass.

A shadow model imitates the target's training on records whose membership the attacker chooses
(Shokri et al., "Membership Inference Attacks Against Machine Learning Models", IEEE S&P 2017;
Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022). LiRA needs
many of them; here the S shadows' parameters are stacked along a leading dimension and trained as
one: ``torch.func.vmap`` of ``grad`` of a ``functional_call`` gives every shadow's gradient in a
single call, and the optimiser updates the stacked tensors in place (the federation's vectorised
engine, `federation.local.train_clients_vectorised`, works the same way).

Each shadow trains on its own records: shadows with fewer records run out of batches earlier in
an epoch and skip the remaining steps (their optimiser state does not move), and a short last
batch is padded with examples of weight zero. The result equals training each shadow on its own
with ``torch.optim.SGD`` or ``torch.optim.Adam`` (tested).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.optim.adam import adam

from gradaudit.federation.local import has_batchnorm
from gradaudit.types import TensorDict

ShadowOptimizer = Literal["sgd", "adam"]

ADAM_BETAS = (0.9, 0.999)
"""``torch.optim.Adam``'s default moment decay rates."""
ADAM_EPS = 1e-8
"""``torch.optim.Adam``'s default denominator term."""

_FUSED_ADAM = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 4)
"""Whether ``torch.optim.adam.adam`` has its fused kernel on the CPU (PyTorch 2.4 and later)."""


def balanced_keep(num_shadows: int, num_records: int, rng: np.random.Generator) -> np.ndarray:
    """Which records each shadow trains on: every record IN for exactly half the shadows.

    Carlini et al.'s balanced scheme: for each record, a random ``num_shadows // 2`` of the
    shadows include it, so each shadow holds about half of the records and every record has
    as many IN as OUT shadows (one more OUT when `num_shadows` is odd).

    Returns:
        A bool array (num_shadows, num_records).

    Example:
        >>> keep = balanced_keep(4, 6, np.random.default_rng(0))
        >>> keep.sum(axis=0).tolist()
        [2, 2, 2, 2, 2, 2]
    """
    ranks = rng.random((num_shadows, num_records)).argsort(axis=0).argsort(axis=0)
    return ranks < num_shadows // 2


@dataclass(frozen=True)
class EpochPlan:
    """The batches of one epoch of every shadow, padded to a common shape.

    Attributes:
        index: (T, S, B) record indices; padding points at record 0.
        weight: (T, S, B) 1 for a real example, 0 for padding.
        active: (T, S) whether the shadow takes step t at all.
    """

    index: Tensor
    weight: Tensor
    active: Tensor


def shadow_epochs(
    keep: np.ndarray,
    *,
    batch_size: int,
    epochs: int | None,
    steps: int | None,
    rng: np.random.Generator,
) -> Iterator[EpochPlan]:
    """The shadows' batches, one padded plan per epoch.

    Each epoch every shadow that still trains draws a fresh permutation of its records (shadows
    in order, from `rng`) and cuts it into batches of `batch_size`, the last possibly smaller.
    With `epochs` every shadow runs that many epochs; with `steps` every shadow takes exactly
    that many steps, going through as many epochs as it needs. A shadow without records never
    steps.

    Example:
        >>> keep = np.array([[True, True, True], [True, False, False]])
        >>> plans = list(shadow_epochs(keep, batch_size=2, epochs=1, steps=None,
        ...                            rng=np.random.default_rng(0)))
        >>> plans[0].active.tolist()
        [[True, True], [True, False]]
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    members = [np.flatnonzero(row) for row in np.asarray(keep, dtype=bool)]
    left = np.array([steps if steps is not None and m.size else 0 for m in members])
    for _ in range(epochs) if epochs is not None else itertools.count():
        if steps is not None and not left.any():
            return
        batches: list[list[np.ndarray]] = []
        for s, records in enumerate(members):
            if records.size == 0 or (steps is not None and left[s] == 0):
                batches.append([])
                continue
            order = rng.permutation(records)
            cut = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
            if steps is not None:
                cut = cut[: left[s]]
                left[s] -= len(cut)
            batches.append(cut)
        yield _pad(batches, batch_size)


def epoch_count(keep: np.ndarray, *, batch_size: int, epochs: int | None, steps: int | None) -> int:
    """How many epochs :func:`shadow_epochs` yields for these shadows.

    Example:
        >>> epoch_count(np.ones((2, 10), bool), batch_size=4, epochs=None, steps=7)
        3
    """
    if epochs is not None:
        return epochs
    sizes = np.asarray(keep, dtype=bool).sum(axis=1)
    per_epoch = -(-sizes[sizes > 0] // batch_size)
    return int((-(-int(steps or 0) // per_epoch)).max(initial=0))


def _pad(batches: Sequence[Sequence[np.ndarray]], batch_size: int) -> EpochPlan:
    """Stack per-shadow batch lists into (T, S, B) arrays with weights and an active mask."""
    num_steps = max((len(b) for b in batches), default=0)
    index = np.zeros((num_steps, len(batches), batch_size), dtype=np.int64)
    weight = np.zeros(index.shape, dtype=np.float32)
    active = np.zeros((num_steps, len(batches)), dtype=bool)
    for s, cut in enumerate(batches):
        for t, batch in enumerate(cut):
            index[t, s, : batch.size] = batch
            weight[t, s, : batch.size] = 1.0
            active[t, s] = True
    return EpochPlan(torch.as_tensor(index), torch.as_tensor(weight), torch.as_tensor(active))


def _stack_init(
    model: nn.Module, init_state: TensorDict | Sequence[TensorDict], num_shadows: int
) -> tuple[TensorDict, TensorDict]:
    """Stacked (S, ...) copies of the starting parameters, and the shared buffers."""
    names = [name for name, _ in model.named_parameters()]
    states = [init_state] * num_shadows if isinstance(init_state, Mapping) else list(init_state)
    if len(states) != num_shadows:
        raise ValueError(f"{len(states)} initial states for {num_shadows} shadows")
    stacked = {k: torch.stack([s[k].detach() for s in states]).clone() for k in names}
    buffers = {k: v.detach() for k, v in states[0].items() if k not in stacked}
    return stacked, buffers


class _StackedOptimizer:
    """SGD or Adam on stacked (S, ...) parameters, stepping only the active shadows.

    The update runs on per-shadow views of the stacked tensors, so each shadow keeps its own
    Adam step count (its bias correction) and an inactive shadow's parameters and moments stay
    exactly as they were. Adam goes through ``torch.optim.adam.adam``, the function
    ``torch.optim.Adam`` itself calls (fused into one kernel where PyTorch has it on the CPU).
    """

    def __init__(self, stacked: TensorDict, *, kind: ShadowOptimizer, lr: float) -> None:
        self.kind = kind
        self.lr = lr
        self.params = [list(v.unbind(0)) for v in stacked.values()]
        num_shadows = next(iter(stacked.values())).shape[0]
        if kind == "adam":
            self.exp_avg = [list(torch.zeros_like(v).unbind(0)) for v in stacked.values()]
            self.exp_avg_sq = [list(torch.zeros_like(v).unbind(0)) for v in stacked.values()]
            self.steps = [[torch.tensor(0.0) for _ in range(num_shadows)] for _ in stacked]

    @torch.no_grad()
    def step(self, grads: TensorDict, active: Sequence[int]) -> None:
        """One step of the shadows listed in `active`, with the stacked gradients `grads`."""
        views = [g.unbind(0) for g in grads.values()]
        params = [p[s] for p in self.params for s in active]
        grads_ = [g[s] for g in views for s in active]
        if self.kind == "sgd":
            torch._foreach_add_(params, grads_, alpha=-self.lr)
            return
        adam(
            params,
            grads_,
            [m[s] for m in self.exp_avg for s in active],
            [v[s] for v in self.exp_avg_sq for s in active],
            [],
            [t[s] for t in self.steps for s in active],
            foreach=False,
            fused=_FUSED_ADAM,
            amsgrad=False,
            beta1=ADAM_BETAS[0],
            beta2=ADAM_BETAS[1],
            lr=self.lr,
            weight_decay=0.0,
            eps=ADAM_EPS,
            maximize=False,
        )


def _weighted_ce(logits: Tensor, y: Tensor, w: Tensor) -> Tensor:
    """The mean cross-entropy over the real (weight 1) examples of a padded batch."""
    losses = nn.functional.cross_entropy(logits, y, reduction="none")
    return (losses * w).sum() / w.sum().clamp_min(1.0)


def train_shadows(
    model: nn.Module,
    init_state: TensorDict | Sequence[TensorDict],
    x: Tensor,
    y: Tensor,
    keep: np.ndarray,
    *,
    optimizer: ShadowOptimizer,
    lr: float,
    batch_size: int,
    epochs: int | None,
    rng: np.random.Generator,
    steps: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TensorDict:
    """Train S shadow models at once, each on its own subset of the records ``(x, y)``.

    Every shadow starts from `init_state` (or from its own entry when a sequence of S states is
    given), minimises the mean cross-entropy of its mini-batches (batches as in
    :func:`shadow_epochs`) with plain SGD or Adam (``torch.optim.Adam``'s defaults: betas
    (0.9, 0.999), eps 1e-8, no weight decay), and is independent of the others: the result
    equals training each shadow alone with ``torch.optim`` (tested).

    Args:
        model: the architecture (its weights are not used; BatchNorm is refused).
        init_state: the state every shadow starts from, or one state per shadow.
        x: all records' inputs (N, ...).
        y: their labels (N,).
        keep: bool (S, N): the records each shadow trains on.
        optimizer: ``sgd`` or ``adam``.
        lr: the learning rate.
        batch_size: examples per step.
        epochs: passes over each shadow's records (or None with `steps`).
        rng: the shuffling stream.
        steps: exactly this many steps per shadow instead of `epochs`.
        progress: called as ``progress(done, total)`` after each epoch.

    Returns:
        The trained parameters keyed like ``model.named_parameters()``, each stacked (S, ...).

    Raises:
        ValueError: the model has BatchNorm (each shadow would need its own running statistics
            and batch statistics do not vectorise), or the arguments disagree in size.
    """
    if has_batchnorm(model):
        raise ValueError(
            "shadow models are trained with torch.func.vmap, which cannot train BatchNorm "
            "(running statistics); use a model without BatchNorm"
        )
    keep = np.asarray(keep, dtype=bool)
    if keep.ndim != 2 or keep.shape[1] != x.shape[0] or y.shape[0] != x.shape[0]:
        raise ValueError(f"keep {keep.shape} does not match {x.shape[0]} records")
    stacked, buffers = _stack_init(model, init_state, keep.shape[0])
    opt = _StackedOptimizer(stacked, kind=optimizer, lr=lr)

    def loss(p: TensorDict, xb: Tensor, yb: Tensor, wb: Tensor) -> Tensor:
        return _weighted_ce(functional_call(model, (p, buffers), (xb,)), yb, wb)

    shadow_grads = vmap(grad(loss))
    everyone = list(range(keep.shape[0]))
    total = epoch_count(keep, batch_size=batch_size, epochs=epochs, steps=steps)
    was_training = model.training
    model.train()
    try:
        plans = shadow_epochs(keep, batch_size=batch_size, epochs=epochs, steps=steps, rng=rng)
        for done, plan in enumerate(plans, start=1):
            active = plan.active.tolist()
            for t in range(plan.index.shape[0]):
                idx = plan.index[t]
                grads = shadow_grads(stacked, x[idx], y[idx], plan.weight[t])
                who = everyone if all(active[t]) else [s for s in everyone if active[t][s]]
                opt.step(grads, who)
            if progress is not None:
                progress(done, total)
    finally:
        model.train(was_training)
    return stacked


@torch.no_grad()
def shadow_logits(model: nn.Module, stacked: TensorDict, x: Tensor, chunk: int = 512) -> Tensor:
    """Every shadow's logits on every record, (S, N, C), in eval mode and without gradients.

    Args:
        model: the architecture; its buffers (none without BatchNorm) are shared by the shadows.
        stacked: parameters stacked (S, ...), as :func:`train_shadows` returns them.
        x: the records (N, ...).
        chunk: records per vectorised forward pass (bounds memory).
    """
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def forward(p: TensorDict, xc: Tensor) -> Tensor:
        return functional_call(model, (p, buffers), (xc,))

    batched = vmap(forward, in_dims=(0, None))
    was_training = model.training
    model.eval()
    try:
        parts = [batched(stacked, x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    finally:
        model.train(was_training)
    if not parts:
        num_shadows = next(iter(stacked.values())).shape[0]
        return torch.zeros(num_shadows, 0, 0)
    return torch.cat(parts, dim=1)


__all__ = [
    "ADAM_BETAS",
    "ADAM_EPS",
    "EpochPlan",
    "ShadowOptimizer",
    "balanced_keep",
    "epoch_count",
    "shadow_epochs",
    "shadow_logits",
    "train_shadows",
]
