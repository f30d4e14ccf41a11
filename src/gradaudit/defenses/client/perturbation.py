"""``dct_mask``: perturbation in the frequency domain (a low-pass filter on kernel gradients).

Palihawadana, Wiratunga, Kalutarage & Wijekoon, "Mitigating Gradient Inversion Attacks in
Federated Learning with Frequency Transformation" (ESORICS 2023 workshops, LNCS 14399)
propose to transform gradients with the discrete cosine transform and prune them there (pFGD).
This module implements the project's own variant of that idea, not a reproduction of their
procedure: every convolution kernel's gradient (a 4-D tensor whose spatial size is at least
2×2) goes through the orthonormal 2-D DCT-II over its two spatial dimensions (Ahmed, Natarajan
& Rao, "Discrete Cosine Transform", IEEE Trans. Computers, 1974), the coefficients beyond the
first ``keep`` share in JPEG zig-zag order (increasing ``u + v``) are set to zero, and the
inverse DCT brings the kernel back. With ``linear: true`` the weight of each fully connected
layer is also low-passed along its input dimension with a 1-D DCT.

Because the DCT is orthonormal, the filter is an orthogonal projection: it never adds energy,
``keep = 1`` returns the input, and a constant kernel (pure DC) passes unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from gradaudit.defenses import CLIENT_DEFENSES
from gradaudit.defenses.base import (
    HEURISTIC,
    ClientDefense,
    DefenseContext,
    LocalData,
    encode_each,
    float_keys,
)
from gradaudit.defenses.client.compression import kept_count
from gradaudit.types import ClientUpdate

logger = logging.getLogger(__name__)


class DctMaskParams(BaseModel):
    """Parameters of ``dct_mask``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    keep: float = Field(
        gt=0,
        le=1,
        description="share of each kernel's DCT coefficients KEPT, lowest frequencies first "
        "(the DC coefficient is always kept)",
    )
    linear: bool = Field(
        False,
        description="also low-pass each fully connected weight along its input dimension (1-D DCT)",
    )


@lru_cache(maxsize=64)
def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix ``C`` (n × n, float64): ``X = C @ x``, ``x = C.T @ X``.

    Row ``k`` is ``sqrt(2/n) * c_k * cos(pi * (2i + 1) * k / (2n))`` with ``c_0 = 1/sqrt(2)``
    and ``c_k = 1`` otherwise, as ``scipy.fft.dct(..., norm="ortho")``.

    Example:
        >>> c = dct_matrix(4)
        >>> bool(torch.allclose(c @ c.T, torch.eye(4, dtype=torch.float64)))
        True
    """
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def zigzag_order(h: int, w: int) -> list[tuple[int, int]]:
    """The (u, v) frequency indices of an h × w grid in JPEG zig-zag order (low ``u + v`` first).

    Within one anti-diagonal the direction alternates as in JPEG: ``u`` ascends on odd
    diagonals and descends on even ones.

    Example:
        >>> zigzag_order(3, 3)
        [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (1, 2), (2, 1), (2, 2)]
        >>> zigzag_order(2, 3)
        [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (1, 2)]
    """
    order: list[tuple[int, int]] = []
    for s in range(h + w - 1):
        diagonal = [(u, s - u) for u in range(max(0, s - w + 1), min(s, h - 1) + 1)]
        order.extend(diagonal if s % 2 else reversed(diagonal))
    return order


def low_pass_mask(h: int, w: int, keep: float) -> Tensor:
    """A boolean h × w mask of the first ``ceil(keep * h * w)`` coefficients in zig-zag order.

    Example:
        >>> low_pass_mask(3, 3, 0.4).int().tolist()
        [[1, 1, 0], [1, 0, 0], [1, 0, 0]]
    """
    mask = torch.zeros(h, w, dtype=torch.bool)
    for u, v in zigzag_order(h, w)[: kept_count(keep, h * w)]:
        mask[u, v] = True
    return mask


def low_pass_2d(x: Tensor, keep: float) -> Tensor:
    """`x` (..., h, w) with each h × w slice's DCT-II beyond the `keep` share set to zero.

    Computed in float64 and returned in `x`'s dtype (a new tensor).

    Example:
        >>> x = torch.arange(9.0).reshape(3, 3)
        >>> bool(torch.allclose(low_pass_2d(x, 1.0), x, atol=1e-6))
        True
        >>> low_pass_2d(x, 0.1)  # only the DC coefficient: the mean
        tensor([[4., 4., 4.],
                [4., 4., 4.],
                [4., 4., 4.]])
    """
    h, w = x.shape[-2:]
    ch, cw = dct_matrix(h).to(x.device), dct_matrix(w).to(x.device)
    mask = low_pass_mask(h, w, keep).to(x.device)
    coefficients = ch @ x.to(torch.float64) @ cw.T
    return (ch.T @ (coefficients * mask) @ cw).to(x.dtype)


def low_pass_1d(x: Tensor, keep: float) -> Tensor:
    """`x` (..., n) with its last dimension's DCT-II beyond the first ``ceil(keep * n)`` zeroed.

    Example:
        >>> low_pass_1d(torch.tensor([[1.0, 3.0]]), 0.5)
        tensor([[2., 2.]])
    """
    n = x.shape[-1]
    c = dct_matrix(n).to(x.device)
    coefficients = x.to(torch.float64) @ c.T
    coefficients[..., kept_count(keep, n) :] = 0.0
    return (coefficients @ c).to(x.dtype)


def is_kernel(t: Tensor) -> bool:
    """Whether `t` is a convolution kernel the filter applies to: 4-D, spatial size ≥ 2×2."""
    return t.is_floating_point() and t.dim() == 4 and t.shape[-2] >= 2 and t.shape[-1] >= 2


def is_linear_weight(t: Tensor) -> bool:
    """Whether `t` is a fully connected weight (out, in) with at least two inputs."""
    return t.is_floating_point() and t.dim() == 2 and t.shape[-1] >= 2


class DctMask(ClientDefense):
    """Low-pass every convolution kernel's gradient in the DCT domain (frequency perturbation).

    In the spirit of pFGD (Palihawadana et al., "Mitigating Gradient Inversion Attacks in
    Federated Learning with Frequency Transformation", ESORICS 2023 workshops): the
    orthonormal 2-D DCT-II of each 4-D kernel over its spatial dimensions keeps its first
    ``ceil(keep * kh * kw)`` coefficients in zig-zag order (the DC term always), the rest are
    zeroed, and the inverse DCT gives the sent kernel. ``linear: true`` also applies a 1-D DCT
    low-pass along the input dimension of 2-D weights. Other tensors are sent unchanged.

    The client sends only the kept coefficients (their positions are public), so
    ``wire_bytes`` counts those plus every untouched tensor dense. Deterministic.
    Guarantee: none (heuristic).
    """

    name = "dct_mask"
    guarantee = HEURISTIC

    def __init__(self, params: DctMaskParams, targets: tuple[str, ...] = ()) -> None:
        self.params = params
        self.targets = targets

    def applies_to(self, t: Tensor) -> bool:
        """Whether the filter changes tensor `t`."""
        return is_kernel(t) or (self.params.linear and is_linear_weight(t))

    def filtered(self, t: Tensor) -> tuple[Tensor, int]:
        """`t` low-passed, and the number of coefficients sent for it."""
        keep = self.params.keep
        if is_kernel(t):
            h, w = t.shape[-2:]
            return low_pass_2d(t, keep), t.shape[0] * t.shape[1] * kept_count(keep, h * w)
        return low_pass_1d(t, keep), t.shape[0] * kept_count(keep, t.shape[-1])

    def transform(
        self, update: ClientUpdate, *, rng: torch.Generator, local: LocalData
    ) -> ClientUpdate:
        """The update with every applicable kernel low-passed; ``wire_bytes`` of what is sent."""

        def encode(key: str, t: Tensor) -> tuple[Tensor, int]:
            low, coefficients = self.filtered(t)
            return low, coefficients * t.element_size()

        keys = [k for k in float_keys(update) if self.applies_to(update.tensors[k])]
        return encode_each(update, keys, encode)

    def describe(self) -> dict[str, Any]:
        """Settings, which tensors are filtered, and what the filter does not hide."""
        p = self.params
        scope = "convolution kernel" + (" and fully connected weight" if p.linear else "")
        untouched = "biases and normalisation layers" + (
            ""
            if p.linear
            else ", and fully connected layers, whose weight gradient reveals "
            "their input analytically"
        )
        notes = [
            f"keeps the lowest {p.keep:.1%} of each {scope}'s DCT coefficients (zig-zag order "
            "for kernels, DC always kept) and zeros the rest",
            f"filtered tensors: {', '.join(self.targets) if self.targets else '(none listed)'}",
        ]
        warnings = [
            "no formal guarantee: the filter is a fixed, public linear projection, so an attack "
            "can match its reconstruction's filtered gradient to the one it observes",
            "the low frequencies of each filtered gradient are sent exactly, and so is every "
            f"tensor the filter does not touch: {untouched}",
        ]
        return self.entry(notes, warnings)


def filtered_keys(state: Mapping[str, Tensor], *, linear: bool) -> tuple[str, ...]:
    """The keys of `state` that ``dct_mask`` changes."""
    return tuple(k for k, t in state.items() if is_kernel(t) or (linear and is_linear_weight(t)))


@CLIENT_DEFENSES.register(
    "dct_mask",
    summary="frequency-domain low-pass of conv kernel gradients (DCT, after Palihawadana et al. "
    "2023); keep the `keep` share of low frequencies; guarantee none (heuristic)",
    params=DctMaskParams,
)
def _build_dct_mask(params: DctMaskParams, context: DefenseContext) -> DctMask:
    """Refuses a model the filter would leave unchanged (no kernel ≥ 2×2, `linear` off)."""
    targets = filtered_keys(context.model.state_dict(), linear=params.linear)
    if not targets:
        raise ValueError(
            "the model has no convolution kernel of at least 2x2 for the DCT filter, so every "
            "update would be sent unchanged; set linear: true to filter fully connected weights"
        )
    return DctMask(params, targets)
