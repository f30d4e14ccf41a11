"""The Gaussian mechanism's building blocks: per-example clipping (DP-SGD) and update clipping.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016) clips every
example's gradient to L2 norm ``clip_norm``, sums, adds ``N(0, (noise_multiplier *
clip_norm)^2)`` to each coordinate and divides by the expected batch size. Per-example gradients
come from ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``), as in Opacus'
functorch path, not from a loop. DP-FedAvg (McMahan et al., ICLR 2018) clips each client's whole
update the same way (:func:`clip_update`).

The noise is drawn from the ``torch.Generator`` the caller passes (seeded, so an audit
reproduces); floating-point Gaussian sampling is not hardened against the attacks that
Opacus' ``secure_mode`` addresses, which matters for a deployment, not for an audit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def per_example_gradients(
    model: nn.Module, x: Tensor, y: Tensor, *, state: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The gradient of each example's cross-entropy, keyed like ``model.named_parameters()``.

    Each tensor has a leading batch dimension: ``grads[name][i]`` is example i's gradient.
    With `state` (a ``state_dict``-keyed mapping) the gradients are taken at those weights and
    buffers instead of the model's own; the model is not changed.

    Raises:
        ValueError: the model has BatchNorm, whose batch statistics mix the examples (per-example
            gradients, and so DP-SGD, are not defined; use GroupNorm or frozen statistics).
    """
    if any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        raise ValueError(
            "per-example gradients are undefined for BatchNorm on batch statistics (it mixes the "
            "examples of a batch); use norm=group, or federation.local.batchnorm=frozen"
        )
    params = {n: (p if state is None else state[n]).detach() for n, p in model.named_parameters()}
    buffers = {n: (b if state is None else state[n]).detach() for n, b in model.named_buffers()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def clip_factors(
    grads: dict[str, Tensor], clip_norm: float | Tensor, *, batch_dims: int = 1
) -> tuple[Tensor, Tensor]:
    """Per-example scale ``min(1, clip_norm / ||g_i||)`` and the norms ``||g_i||``.

    The first `batch_dims` dimensions index examples (2: clients x examples, with
    `clip_norm` a tensor broadcasting against them for a bound per client).

    Example:
        >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
        >>> factors, norms = clip_factors(g, 1.0)
        >>> [round(v, 3) for v in factors.tolist()], norms.tolist()
        ([0.2, 1.0], [5.0, 0.5])
    """
    if not bool(torch.all(torch.as_tensor(clip_norm) > 0)):
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    squares = [g.pow(2).flatten(batch_dims).sum(dim=batch_dims) for g in grads.values()]
    norms = torch.stack(squares).sum(dim=0).sqrt()
    return (clip_norm / (norms + 1e-12)).clamp(max=1.0), norms


def noised_mean(
    summed: dict[str, Tensor], *, std: float, expected_batch_size: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """``(summed + N(0, std^2)) / expected_batch_size`` per tensor, noise drawn in key order."""
    return {
        n: (v + std * torch.randn(v.shape, generator=generator)) / expected_batch_size
        for n, v in summed.items()
    }


def dp_sgd_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """One DP-SGD gradient: clipped per-example sum plus Gaussian noise, over the expected size.

    With Poisson sampling the batch size varies; dividing by the *expected* size keeps the
    sensitivity at ``clip_norm / expected_batch_size`` (Abadi et al.; Opacus does the same).
    An empty batch yields pure noise.
    """
    names = [name for name, _ in model.named_parameters()]
    if x.shape[0] == 0:
        summed = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    else:
        grads = per_example_gradients(model, x, y)
        factors, _ = clip_factors(grads, clip_norm)
        summed = {n: torch.einsum("b,b...->...", factors, grads[n]) for n in names}
    return noised_mean(
        summed,
        std=noise_multiplier * clip_norm,
        expected_batch_size=expected_batch_size,
        generator=generator,
    )


def clip_update(
    tensors: dict[str, Tensor], keys: list[str], clip_norm: float
) -> tuple[dict[str, Tensor], float]:
    """Scale the `keys` entries of an update so their joint L2 norm is at most `clip_norm`.

    Returns the clipped update (other entries unchanged) and the norm before clipping.

    Example:
        >>> out, norm = clip_update({"w": torch.tensor([3.0, 4.0])}, ["w"], 1.0)
        >>> out["w"].tolist(), norm
        ([0.6000000238418579, 0.800000011920929], 5.0)
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    norm = float(torch.cat([tensors[k].reshape(-1) for k in keys]).norm())
    factor = min(1.0, clip_norm / (norm + 1e-12))
    return {k: (v * factor if k in keys else v) for k, v in tensors.items()}, norm


def update_noise_multiplier(total: float, count_noise: float) -> float:
    """The update's noise multiplier when the clipped-count query shares the privacy budget.

    Adaptive clipping releases two Gaussian queries per round: the clipped update sum (noise
    multiplier ``z_update``) and the count of unclipped clients (sensitivity 1/2 with the
    count centred, noise std ``count_noise``). Their composition equals one Gaussian with
    ``total`` when ``z_update = (total^-2 - (2 * count_noise)^-2)^-1/2`` (Andrew, Thakkar,
    McMahan & Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS
    2021, Thm. 1), so the ledger records one mechanism with `total`.

    Example:
        >>> round(update_noise_multiplier(1.0, 5.0), 4)
        1.005

    Raises:
        ValueError: `count_noise` too small for `total` (the count alone would spend it).
    """
    if not total > 0 or not count_noise > 0:
        raise ValueError("noise multipliers must be > 0")
    rest = total**-2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise ValueError(
            f"count_noise {count_noise} leaves no budget for the update at noise multiplier "
            f"{total}: it needs count_noise > {1 / (2 * total):.4g}"
        )
    return rest**-0.5


def next_clip_norm(
    clip_norm: float,
    unclipped: int,
    expected_clients: float,
    *,
    target_unclipped_quantile: float,
    learning_rate: float,
    count_noise: float,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One geometric step of adaptive clipping (Andrew et al. 2021, Alg. 1).

    The server estimates the fraction of clients whose update was not clipped from the noised
    count, ``b = (unclipped + N(0, count_noise^2)) / expected_clients``, and moves the clip norm
    toward the target quantile: ``C <- C * exp(-learning_rate * (b - target))``. Too many
    unclipped clients (``b > target``) shrink C; too few grow it.

    Returns:
        The next clip norm and the noised unclipped fraction.
    """
    noise = float(torch.randn((), generator=generator)) * count_noise
    fraction = (unclipped + noise) / expected_clients
    return clip_norm * float(
        torch.exp(torch.tensor(-learning_rate * (fraction - target_unclipped_quantile)))
    ), fraction
