"""The client's local computation, replayed differentiably on candidate inputs.

Gradient-matching attacks compare what the client sent with what the same computation would send
for the attacker's candidate inputs. For FedSGD that is one gradient. For FedAvg it is the model
change after several local SGD steps, which the attacker reproduces by unrolling those steps with
``torch.func.functional_call`` and differentiating through all of them (Geiping et al. 2020, §5,
"Inverting Gradients - How easy is it to break privacy in federated learning?"). Replacing the
delta by one gradient is the fallback when the local hyperparameters are unknown.

The same replay yields the BatchNorm statistics the candidate would have produced, which are
matched against the running-statistics change the client sent (:func:`bn_statistics_target`;
DeepInversion, Yin et al., CVPR 2020).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gradaudit.types import ClientUpdate, Observation

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss(logits, example_index)``: the training loss of a local batch given which candidate
examples (indices into the candidate batch) it holds."""

UnrollMode = Literal["auto", "always", "never"]


def labelled_loss(labels: Tensor) -> LossFn:
    """The cross-entropy of a local batch whose candidate examples carry `labels`."""

    def loss(logits: Tensor, index: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits, labels[index])

    return loss


@dataclass(frozen=True)
class LocalReplay:
    """How the attacker replays the client's local computation.

    Attributes:
        unrolled: True to unroll local SGD steps (FedAvg), False for one gradient (FedSGD, or a
            delta treated as one gradient).
        lr: the local learning rate (unrolled only).
        batches: per local step, the candidate examples it uses (unrolled only).
        description: one line for the report.
    """

    unrolled: bool
    lr: float = 0.0
    batches: tuple[Tensor, ...] = ()
    description: str = "one gradient on the whole candidate batch"

    @property
    def steps(self) -> int:
        """Local steps replayed (1 for a gradient)."""
        return len(self.batches) if self.unrolled else 1


def replay_batches(count: int, batch_size: int, steps: int) -> tuple[Tensor, ...]:
    """The candidate examples of each of `steps` local batches, cycling through ``0..count-1``.

    The client shuffles its data every epoch; the order is unknown to the attacker and, since
    the candidates are free variables, the first epoch may take them in order without loss of
    generality. Later epochs reuse the same order (an approximation for more than one epoch).

    Example:
        >>> [b.tolist() for b in replay_batches(5, 2, 4)]
        [[0, 1], [2, 3], [4], [0, 1]]
    """
    per_epoch = [
        torch.arange(start, min(start + batch_size, count)) for start in range(0, count, batch_size)
    ]
    return tuple(per_epoch[i % len(per_epoch)] for i in range(steps))


def local_replay(update: ClientUpdate, obs: Observation, mode: UnrollMode) -> LocalReplay:
    """Choose how to replay the target's update.

    ``auto`` unrolls a FedAvg delta when the threat model grants the local hyperparameters
    (learning rate, batch size and step count), else treats the delta as one gradient; ``always``
    requires them; ``never`` always uses one gradient.

    Raises:
        ValueError: ``always`` without the local hyperparameters.
    """
    if update.kind == "gradient" or mode == "never":
        return LocalReplay(unrolled=False)
    hyper = obs.side_info.get("local_hyperparameters")
    known = (
        isinstance(hyper, dict)
        and hyper.get("lr")
        and hyper.get("batch_size")
        and hyper.get("num_steps")
    )
    if not known:
        if mode == "always":
            raise ValueError(
                "unroll=always needs the local hyperparameters (add local_hyperparameters to "
                "threat.knows)"
            )
        return LocalReplay(
            unrolled=False,
            description="the FedAvg delta treated as one gradient (local hyperparameters unknown)",
        )
    assert isinstance(hyper, dict)
    steps, batch_size = int(hyper["num_steps"]), int(hyper["batch_size"])
    batches = replay_batches(update.num_examples, batch_size, steps)
    return LocalReplay(
        unrolled=True,
        lr=float(hyper["lr"]),
        batches=batches,
        description=f"{steps} local SGD steps unrolled (lr {hyper['lr']}, batch {batch_size})",
    )


@dataclass
class BatchNormRecorder:
    """Collects, per BatchNorm layer and local step, the batch mean and variance of its input."""

    layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]]
    stats: dict[str, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)

    def clear(self) -> None:
        """Forget what was recorded."""
        self.stats = {name: [] for name, _ in self.layers}


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The model's BatchNorm layers that keep running statistics with a fixed momentum."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.track_running_stats
        and module.momentum is not None
    ]


@contextmanager
def recording_batchnorm(model: nn.Module) -> Iterator[BatchNormRecorder]:
    """Record the (differentiable) batch statistics every BatchNorm layer sees while active."""
    recorder = BatchNormRecorder(batchnorm_layers(model))
    recorder.clear()
    handles = []
    for name, module in recorder.layers:

        def hook(_m: nn.Module, inputs: tuple[Tensor, ...], _o: Tensor, name: str = name) -> None:
            x = inputs[0]
            dims = [0, *range(2, x.dim())]
            recorder.stats[name].append((x.mean(dim=dims), x.var(dim=dims, unbiased=True)))

        handles.append(module.register_forward_hook(hook))
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


def bn_statistics_target(
    update: ClientUpdate, layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]]
) -> dict[str, tuple[Tensor, Tensor]] | None:
    """The running-statistics change the client sent, per BatchNorm layer, or None.

    A client training with batch statistics moves each running mean by
    ``momentum * (batch mean - running mean)`` per local step, so the buffers it sends reveal
    the mean and variance of every BatchNorm layer's input on its private batch: the statistics
    DeepInversion (Yin et al. 2020) matches. None when the update carries no such change (the
    client froze BatchNorm, withheld the layer, or the model has none).
    """
    found: dict[str, tuple[Tensor, Tensor]] = {}
    sent = {key: update.tensors[key] for key in update.sent_keys}
    for name, _ in layers:
        mean = sent.get(f"{name}.running_mean")
        var = sent.get(f"{name}.running_var")
        if mean is None or var is None:
            return None
        found[name] = (mean.detach(), var.detach())
    if not found or all(float(m.abs().max()) == 0.0 for m, _ in found.values()):
        return None
    return found


def bn_statistics_distance(
    recorder: BatchNormRecorder,
    layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]],
    running: dict[str, tuple[Tensor, Tensor]],
    target: dict[str, tuple[Tensor, Tensor]],
) -> Tensor:
    """DeepInversion's statistics prior, on running-statistics changes, relative per layer.

    The candidate's recorded per-step statistics are pushed through the same exponential
    averaging as the client's buffers (starting from the global `running` statistics), and the
    predicted change is compared with the observed `target` change: per layer
    ``||d_mean - d_mean*|| / ||d_mean*|| + ||d_var - d_var*|| / ||d_var*||``, averaged over the
    layers. For one local step that is the relative distance between the candidate's batch
    statistics and the client's, DeepInversion's ``||mu - mu*|| + ||var - var*||`` made
    scale-free so no layer dominates (Yin et al., "Dreaming to Distill", CVPR 2020).
    """
    terms: list[Tensor] = []
    for name, module in layers:
        momentum = float(module.momentum)  # type: ignore[arg-type]
        steps = recorder.stats[name]
        if not steps:
            continue
        mean0, var0 = running[name]
        mean, var = mean0, var0
        for batch_mean, batch_var in steps:
            mean = (1 - momentum) * mean + momentum * batch_mean
            var = (1 - momentum) * var + momentum * batch_var
        d_mean, d_var = target[name]
        terms.append(
            ((mean - mean0) - d_mean).norm() / d_mean.norm().clamp_min(1e-12)
            + ((var - var0) - d_var).norm() / d_var.norm().clamp_min(1e-12)
        )
    if not terms:
        raise ValueError("no BatchNorm statistics were recorded")
    return torch.stack(terms).mean()


def simulated_update(
    model: nn.Module,
    x: Tensor,
    loss_fn: LossFn,
    replay: LocalReplay,
    *,
    create_graph: bool = True,
) -> list[Tensor]:
    """What the client would send for candidate inputs `x`, as a gradient-like list.

    For a gradient replay: the gradient of ``loss_fn(model(x), all)`` w.r.t. the parameters.
    Unrolled: ``(theta_0 - theta_T) / (lr * T)`` after T local SGD steps, differentiable in `x`
    (the same scale as :func:`gradaudit.attacks.base.gradient_estimate` gives the observed delta).
    The list follows ``model.named_parameters()``.
    """
    names = [name for name, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    if not replay.unrolled:
        loss = loss_fn(model(x), torch.arange(x.shape[0]))
        return list(torch.autograd.grad(loss, params, create_graph=create_graph))
    theta = list(params)
    for batch in replay.batches:
        logits = functional_call(model, dict(zip(names, theta, strict=True)), (x[batch],))
        grads = torch.autograd.grad(loss_fn(logits, batch), theta, create_graph=create_graph)
        theta = [t - replay.lr * g for t, g in zip(theta, grads, strict=True)]
    scale = 1.0 / (replay.lr * len(replay.batches))
    return [(p0 - t) * scale for p0, t in zip(params, theta, strict=True)]


def mean_candidate_update(
    model: nn.Module,
    loss_fn: LossFn,
    replay: LocalReplay,
    dummy: Callable[[], Tensor],
    *,
    samples: int,
) -> list[Tensor]:
    """The simulated update averaged over `samples` dummy candidate batches from `dummy()`.

    It estimates the part of the client's update that does not depend on its inputs (at
    initialisation most of the deep layers' gradient is that part).
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    total: list[Tensor] | None = None
    for _ in range(samples):
        update = [u.detach() / samples for u in simulated_update(model, dummy(), loss_fn, replay)]
        total = update if total is None else [t + u for t, u in zip(total, update, strict=True)]
    model.load_state_dict(state)
    assert total is not None
    return total
