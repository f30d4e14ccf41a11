"""Attacker-side validation: how much to trust each reconstruction, from the update alone.

A real adversary has no ground truth; it filters its reconstructions for plausibility. The
plausibility measured here is how well each reconstruction explains the part of the target's
gradient that no other reconstruction explains (leave-one-out attribution). It reads only what
the adversary holds: the global model, the observed update and the reconstruction itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from gradaudit.federation.local import has_batchnorm

ValidationMethod = Literal["leave_one_out", "batch"]


@dataclass(frozen=True)
class Validation:
    """Per-reconstruction confidence and how it was obtained.

    Attributes:
        confidence: one value per reconstructed input in [-1, 1]: a cosine, 1 when the
            reconstruction explains its share of the gradient exactly.
        method: ``leave_one_out`` (a value per image) or ``batch`` (one value, that of the
            whole reconstructed batch, repeated: per-image attribution was not possible).
        note: one sentence for the report on what the value means.
    """

    confidence: Tensor
    method: ValidationMethod
    note: str


def flat_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of two flat vectors in float64 (0 when either is zero).

    Example:
        >>> float(flat_cosine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])))
        1.0
    """
    a, b = a.to(torch.float64), b.to(torch.float64)
    denom = a.norm() * b.norm()
    return (a @ b) / denom if float(denom) > 0 else torch.zeros((), dtype=torch.float64)


def leave_one_out_cosines(
    per_example: Tensor, target: Tensor, *, reference: Tensor | None = None, fit_scale: bool
) -> Tensor:
    """Cosine of each example's gradient with the residual the others leave unexplained.

    With per-example gradients ``g_i`` of the reconstruction (rows of `per_example`, B of them)
    and the observed mean gradient ``g`` of the client's batch, the residual attributed to
    example ``i`` is ``r_i = a·B·g - sum_{j != i} g_j`` and its confidence is
    ``cos(g_i - c_i, r_i - c_i)``, where ``c_i`` is the gradient an uninformative input with
    example ``i``'s label would produce (zero when `reference` is None). For B = 1 this is
    ``cos(g_1 - c_1, g - c_1)``. A reconstruction equal to the truth gets exactly 1 whatever
    ``c_i``; one equal to the reference input gets 0.

    Args:
        per_example: (B, P) flattened per-example gradients of the reconstruction.
        target: (P,) the observed gradient (the client's batch mean).
        reference: (B, P) the gradients ``c_i``, or None.
        fit_scale: fit ``a`` by least squares (``a·B·g ≈ sum_j g_j``) when the target's scale
            is unknown, as for a FedAvg model change; otherwise ``a = 1``.

    Returns:
        (B,) float64 cosines.

    Example:
        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> leave_one_out_cosines(g, g.mean(dim=0), fit_scale=False).tolist()
        [1.0, 1.0]
        >>> wrong = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # the second one points the wrong way
        >>> leave_one_out_cosines(wrong, g.mean(dim=0), fit_scale=False).round(decimals=3).tolist()
        [0.447, -1.0]
    """
    per_example = per_example.to(torch.float64)
    target = target.to(torch.float64)
    count = per_example.shape[0]
    total = per_example.sum(dim=0)
    scaled = count * target
    if fit_scale:
        norm_sq = float(scaled @ scaled)
        scaled = scaled * (float(scaled @ total) / norm_sq if norm_sq > 0 else 0.0)
    residuals = scaled.unsqueeze(0) - (total.unsqueeze(0) - per_example)
    if reference is not None:
        reference = reference.to(torch.float64)
        per_example, residuals = per_example - reference, residuals - reference
    return torch.stack([flat_cosine(g, r) for g, r in zip(per_example, residuals, strict=True)])


def _flat_gradient(model: nn.Module, names: list[str], x: Tensor, y: Tensor) -> Tensor:
    params = dict(model.named_parameters())
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(params[n])).detach().reshape(-1)
            for n, g in zip(names, grads, strict=True)
        ]
    )


def reconstruction_confidence(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    target: Mapping[str, Tensor],
    *,
    train_mode: bool,
    fit_scale: bool = False,
    center: bool = True,
) -> Validation:
    """The attacker's confidence in each reconstructed input, from the gradient it observed.

    Computes the gradient of the cross-entropy that each reconstruction would have produced
    under the global model and compares it with the observed update (`leave_one_out_cosines`).
    Only the attacker's own material enters: no private data is read.

    Centring (on by default): at initialisation most of a deep network's gradient norm sits in
    layers whose gradient barely depends on the input, so a raw cosine is close to 1 for any
    image with the right label (0.985-0.99 for noise images on CIFAR-10's ConvNet). Both sides
    are therefore measured relative to the gradient of an uninformative input with the same
    label, the all-zero input in model space (the mean colour of a normalised image task).
    The reference is deterministic, so the confidence needs no randomness.

    When the client's BatchNorm normalised with batch statistics (`train_mode` and the model
    has BatchNorm) and the batch holds several examples, one example's gradient depends on the
    others, so per-example gradients do not add up to the batch gradient and cannot be
    attributed. The confidence is then the (centred) cosine of the whole reconstructed batch's
    gradient with the target, given to every image.

    Args:
        model: the attacker's copy of the architecture holding the global parameters
            (`attacks.base.attacker_model`). Left unchanged, BatchNorm statistics included.
        images: (B, ...) reconstructed inputs in model space (normalised).
        labels: (B,) their labels.
        target: the target's gradient estimate keyed by parameter name
            (`attacks.base.gradient_estimate`, which holds only the keys the client sent);
            parameters missing from it (withheld, e.g. a private head) are not compared.
        train_mode: whether the client's BatchNorm used batch statistics
            (`attacks.base.client_trains_batchnorm`).
        fit_scale: the target's scale is unknown (a FedAvg change): fit it (see
            `leave_one_out_cosines`).
        center: subtract the reference gradient from both sides.

    Returns:
        The per-image confidence, the method used and a sentence describing it.
    """
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if images.shape[0] == 0:
        raise ValueError("no reconstruction to validate")
    names = [n for n, _ in model.named_parameters() if n in target]
    if not names:
        raise ValueError("the target gradient has none of the model's parameters")
    flat_target = torch.cat([target[n].detach().reshape(-1) for n in names]).to(torch.float64)
    count = int(images.shape[0])
    x, y = images.detach(), labels.long()
    blank = torch.zeros_like(x)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    try:
        model.train(train_mode)
        if train_mode and has_batchnorm(model) and count > 1:
            whole = _flat_gradient(model, names, x, y).to(torch.float64)
            if center:
                reference = _flat_gradient(model, names, blank, y).to(torch.float64)
                whole, flat_target = whole - reference, flat_target - reference
            return Validation(
                flat_cosine(whole, flat_target).repeat(count),
                "batch",
                "BatchNorm normalised the client's batch with its own statistics, which couples "
                "the examples' gradients: no per-image attribution is possible, so every image "
                "gets the cosine of the whole reconstructed batch's gradient with the update.",
            )
        per_example = torch.stack(
            [_flat_gradient(model, names, x[i : i + 1], y[i : i + 1]) for i in range(count)]
        )
        reference = None
        if center:
            by_label = {
                int(c): _flat_gradient(model, names, blank[:1], c.reshape(1)) for c in y.unique()
            }
            reference = torch.stack([by_label[int(c)] for c in y])
    finally:
        model.load_state_dict(state)
        model.train(was_training)
    note = (
        "cosine of the reconstruction's gradient with the update"
        if count == 1
        else "cosine of each reconstruction's gradient with the part of the update that the "
        "other reconstructions leave unexplained (leave-one-out)"
    )
    if center:
        note += ", both relative to the gradient of a blank image with the same label"
    return Validation(
        leave_one_out_cosines(per_example, flat_target, reference=reference, fit_scale=fit_scale),
        "leave_one_out",
        note,
    )


def validate_reconstruction(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None,
    target: Mapping[str, Tensor],
    *,
    train_mode: bool,
    fit_scale: bool = False,
) -> Validation:
    """`reconstruction_confidence`, also for a single reconstruction whose label is unknown.

    An attack that recovers an input but no label (the analytic attack) leaves the attacker to
    pick one: for a single image every class is tried and the most confident kept, as an
    attacker would.

    Raises:
        ValueError: several images and no labels (too many combinations to try).
    """
    if labels is not None:
        return reconstruction_confidence(
            model, images, labels, target, train_mode=train_mode, fit_scale=fit_scale
        )
    if images.shape[0] != 1:
        raise ValueError(f"{images.shape[0]} reconstructions without labels cannot be validated")
    was_training = model.training
    with torch.no_grad():  # eval mode: no BatchNorm statistic changes
        classes = int(model.eval()(images.detach()).shape[1])
    model.train(was_training)
    tried = [
        reconstruction_confidence(
            model, images, torch.tensor([c]), target, train_mode=train_mode, fit_scale=fit_scale
        )
        for c in range(classes)
    ]
    best = max(range(classes), key=lambda c: float(tried[c].confidence[0]))
    return Validation(
        tried[best].confidence,
        tried[best].method,
        f"{tried[best].note}; the label is unknown, so the most confident of the {classes} "
        f"classes ({best})",
    )
