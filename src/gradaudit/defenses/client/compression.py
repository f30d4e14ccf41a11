"""Compression as a defense: ``topk``, ``random_sparsify`` and ``quantize``.

Communication-efficient encodings of an update are often proposed as gradient-leakage
defenses too (Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019, Sec. 6, prune small
gradient entries). None of them has a privacy proof: each one sends a deterministic or randomly
thinned function of the exact update, so every guarantee here is :data:`HEURISTIC`.

Each defense acts on the sent floating-point tensors only (:func:`float_keys`), returns a new
update and sets ``wire_bytes`` to the size of a realistic encoding:

- sparse tensors: the kept values plus either a 4-byte index per kept entry or a bitmap of one
  bit per entry, whichever is smaller (:func:`sparse_bytes`);
- QSGD: a 4-byte norm per tensor plus ``bits`` level bits and one sign bit per entry;
- scaled sign: one bit per entry plus a 4-byte scale per tensor;
- everything else that is sent (integer buffers such as ``num_batches_tracked``): dense.

A later compressor in the same stack re-encodes what it receives as if it were dense floats, so
stacking two compressors counts only the last one's encoding.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
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
from gradaudit.types import ClientUpdate

INDEX_BYTES = 4
"""Bytes of one sparse index (int32: enough for any tensor below 2^32 entries)."""

SCALAR_BYTES = 4
"""Bytes of one float32 side value (a QSGD norm, a sign scale)."""

DEFAULT_QSGD_BITS = 4
"""QSGD's level bits when `bits` is not given (15 levels, as in Alistarh et al.'s 4-bit runs)."""


# --- shared helpers -------------------------------------------------------------------------


def kept_count(fraction: float, numel: int) -> int:
    """Entries kept when keeping `fraction` of `numel`: ``ceil(fraction * numel)``, at least one.

    Rounding up means at most ``1 - fraction`` of the entries is ever removed, so the defense is
    never stronger than its setting says. The product is rounded to 6 decimals first so that
    float error (``0.7 * 10 = 7.000000000000001``) does not add an entry.

    Example:
        >>> kept_count(0.8, 10), kept_count(0.7, 10), kept_count(0.01, 10), kept_count(1.0, 7)
        (8, 7, 1, 7)
        >>> kept_count(0.5, 0)
        0
    """
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(round(fraction * numel, 6))))


def sparse_bytes(kept: int, numel: int, value_bytes: int = 4) -> int:
    """Bytes of a sparse tensor: kept values plus indices or a bitmap, whichever is smaller.

    Index encoding: ``kept * (value_bytes + 4)``. Bitmap encoding: ``kept * value_bytes +
    ceil(numel / 8)``. The bitmap wins once more than 1/32 of the entries are kept.

    Example:
        >>> sparse_bytes(10, 1000)  # 10 * (4 + 4) < 40 + 125
        80
        >>> sparse_bytes(500, 1000)  # 2000 + 125 < 500 * 8
        2125
    """
    return min(kept * (value_bytes + INDEX_BYTES), kept * value_bytes + math.ceil(numel / 8))


def top_k_mask(x: Tensor, k: int) -> Tensor:
    """A boolean mask of `x`'s shape marking exactly `k` largest-magnitude entries.

    Ties at the threshold are broken by :func:`torch.topk`, so exactly `k` entries are marked.

    Example:
        >>> top_k_mask(torch.tensor([0.1, -3.0, 2.0, 0.0]), 2).tolist()
        [False, True, True, False]
    """
    flat = x.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=x.device)
    if k > 0:
        mask[flat.abs().topk(k, sorted=False).indices] = True
    return mask.view(x.shape)


def _sparse(x: Tensor, mask: Tensor, scale: float = 1.0) -> tuple[Tensor, int]:
    """`x` times `scale` where `mask`, exact zeros elsewhere (a new tensor), and its sparse
    encoding's size (:func:`sparse_bytes`)."""
    kept = torch.where(mask, x * scale if scale != 1.0 else x, torch.zeros((), dtype=x.dtype))
    return kept, sparse_bytes(int(mask.sum()), x.numel(), x.element_size())


# --- top-k ----------------------------------------------------------------------------------


class TopKParams(BaseModel):
    """Parameters of ``topk``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: float = Field(
        gt=0,
        le=1,
        description="share of entries KEPT (largest magnitude); pruning 20% is fraction 0.8",
    )
    scope: Literal["per_tensor", "global"] = Field(
        "per_tensor",
        description="per_tensor: keep `fraction` of every tensor (as DLG's per-layer pruning); "
        "global: keep `fraction` of the whole update, so layers with small entries may vanish",
    )


class TopK(ClientDefense):
    """Top-k sparsification: send the largest-magnitude entries, zero the rest.

    Zhu, Liu & Han, "Deep Leakage from Gradients" (NeurIPS 2019), Sec. 6, prune the
    small-magnitude gradient entries of each layer (as in deep gradient compression, Lin et
    al., ICLR 2018) and report that DLG fails on LeNet once more than about 20% are pruned.
    `fraction` is the share KEPT: pruning 20% is ``fraction: 0.8``, and the paper's threshold
    is ``fraction < 0.8``. Each tensor keeps ``ceil(fraction * numel)`` entries
    (``per_tensor``, the default, DLG's per-layer setting, which also keeps every layer
    training); ``global`` ranks all entries of the update together (each tensor is still
    encoded on its own, which is never larger than one joint encoding).

    No error feedback: the pruned mass is dropped, not accumulated for later rounds.
    Deterministic (the generator is not used). Guarantee: none (heuristic).
    """

    name = "topk"
    guarantee = HEURISTIC

    def __init__(self, params: TopKParams) -> None:
        self.params = params

    def masks(self, update: ClientUpdate) -> dict[str, Tensor]:
        """Which entries of each sent float tensor are kept."""
        keys = float_keys(update)
        fraction = self.params.fraction
        if self.params.scope == "per_tensor":
            return {
                k: top_k_mask(update.tensors[k], kept_count(fraction, update.tensors[k].numel()))
                for k in keys
            }
        flat = torch.cat([update.tensors[k].detach().reshape(-1).abs() for k in keys])
        joint = top_k_mask(flat, kept_count(fraction, flat.numel()))
        sizes = [update.tensors[k].numel() for k in keys]
        return {
            k: part.view(update.tensors[k].shape)
            for k, part in zip(keys, joint.split(sizes), strict=True)
        }

    def transform(
        self, update: ClientUpdate, *, rng: torch.Generator, local: LocalData
    ) -> ClientUpdate:
        """The update with all but the kept entries zeroed; ``wire_bytes`` as sparse tensors."""
        keys = float_keys(update)
        if not keys:
            return update
        masks = self.masks(update)
        return encode_each(update, keys, lambda key, t: _sparse(t, masks[key]))

    def describe(self) -> dict[str, Any]:
        """Settings, what top-k sparsification does, and why it is no guarantee."""
        p = self.params
        where = "of every tensor" if p.scope == "per_tensor" else "of the whole update"
        warnings = [
            "no formal guarantee: the kept entries are sent exactly, and the largest entries "
            "carry most of what gradient-matching attacks match",
            "for a fully connected layer, a weight-gradient row divided by its bias-gradient "
            "entry is the layer's input (one example): every input feature whose entry "
            "survives is recovered exactly, and the kept positions reveal which inputs were "
            "non-zero",
        ]
        if p.fraction >= 0.8:
            warnings.append(
                f"keeps {p.fraction:.0%}: Zhu et al. report DLG still succeeds on LeNet when at "
                "most 20% is pruned"
            )
        if p.scope == "global":
            warnings.append(
                "scope global: layers whose entries are small overall may be sent empty, and "
                "layers with large entries may be sent almost whole"
            )
        notes = [
            f"keeps the {p.fraction:.1%} largest-magnitude entries {where} and zeros the rest "
            f"(prunes {1 - p.fraction:.1%}); sent as values plus indices or a bitmap",
            "Zhu et al. 2019 (DLG, Sec. 6) found DLG on LeNet fails once more than about 20% is "
            "pruned; that is one attack on one model, not a bound on what other attacks recover",
            "no error feedback: the pruned part of each update is lost, which costs accuracy",
        ]
        return self.entry(notes, warnings)


@CLIENT_DEFENSES.register(
    "topk",
    summary="top-k sparsification (Zhu et al. 2019, DLG Sec. 6): keep the `fraction` "
    "largest-magnitude entries; guarantee none (heuristic)",
    params=TopKParams,
)
def _build_topk(params: TopKParams, context: DefenseContext) -> TopK:
    return TopK(params)


# --- random sparsification ------------------------------------------------------------------


class RandomSparsifyParams(BaseModel):
    """Parameters of ``random_sparsify``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: float = Field(
        gt=0,
        le=1,
        description="probability that each entry is KEPT (kept entries are scaled by 1/fraction)",
    )


class RandomSparsify(ClientDefense):
    """Unbiased random sparsification: keep each entry with probability `fraction`, rescaled.

    Each entry of each sent float tensor is kept independently with probability ``p =
    fraction`` and divided by ``p``, so the sent update equals the true one in expectation
    (Konečný, McMahan, Yu, Richtárik, Suresh & Bacon, "Federated Learning: Strategies for
    Improving Communication Efficiency", 2016, subsampled sketched updates; the uniform case
    of Wangni, Wang, Liu & Zhang, "Gradient Sparsification for Communication-Efficient
    Distributed Optimization", NeurIPS 2018). Each entry's variance grows by ``v^2 (1/p - 1)``.
    Randomness comes only from the generator the round loop passes.

    The kept positions are sent as indices or a bitmap (not as a seed the server would need to
    share). Guarantee: none (heuristic).
    """

    name = "random_sparsify"
    guarantee = HEURISTIC

    def __init__(self, params: RandomSparsifyParams) -> None:
        self.params = params

    def transform(
        self, update: ClientUpdate, *, rng: torch.Generator, local: LocalData
    ) -> ClientUpdate:
        """The update with a random `fraction` of entries kept and scaled by ``1/fraction``."""
        p = self.params.fraction

        def keep_some(key: str, t: Tensor) -> tuple[Tensor, int]:
            return _sparse(t, (torch.rand(t.shape, generator=rng) < p).to(t.device), 1.0 / p)

        return encode_each(update, float_keys(update), keep_some)

    def describe(self) -> dict[str, Any]:
        """Settings, what random sparsification does, and why it is no guarantee."""
        p = self.params.fraction
        notes = [
            f"keeps each entry with probability {p:g} and scales it by {1 / p:.4g}: unbiased, "
            "with extra variance v^2 (1/p - 1) per entry; sent as values plus indices or a bitmap",
        ]
        warnings = [
            "no formal guarantee: every kept entry is the true one times a public constant, and "
            "the sent support is a subset of the true support; an attack can treat dropped "
            "entries as missing",
            "dropping coordinates of one update is not subsampling of examples or clients: it "
            "gives no privacy amplification",
        ]
        return self.entry(notes, warnings)


@CLIENT_DEFENSES.register(
    "random_sparsify",
    summary="unbiased random sparsification (Konečný et al. 2016; Wangni et al. 2018): keep each "
    "entry with probability `fraction`, scaled by 1/fraction; guarantee none (heuristic)",
    params=RandomSparsifyParams,
)
def _build_random_sparsify(params: RandomSparsifyParams, context: DefenseContext) -> RandomSparsify:
    return RandomSparsify(params)


# --- quantisation ---------------------------------------------------------------------------


class QuantizeParams(BaseModel):
    """Parameters of ``quantize``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["qsgd", "sign"] = Field(
        "qsgd",
        description="qsgd: stochastic rounding to 2^bits - 1 levels of the norm (unbiased); "
        "sign: sign times the mean magnitude per tensor (biased)",
    )
    bits: int | None = Field(
        None,
        ge=1,
        le=16,
        description=f"qsgd only: bits per level index (default {DEFAULT_QSGD_BITS}); each entry "
        "also sends one sign bit",
    )

    @model_validator(mode="after")
    def _bits_for_qsgd(self) -> QuantizeParams:
        if self.method == "sign" and self.bits is not None:
            raise ValueError("bits applies to method qsgd only (sign sends one bit per entry)")
        return self


def qsgd_quantize(v: Tensor, levels: int, rng: torch.Generator) -> Tensor:
    """QSGD's stochastic quantisation of `v` to `levels` levels of its L2 norm (unbiased).

    Each ``|v_i| / ||v||`` in [0, 1] is rounded to one of its two neighbouring levels ``l/s``
    and ``(l+1)/s`` with the probabilities that make the result's mean exact (Alistarh et al.
    2017, Sec. 3.1); the sign is kept. A zero tensor stays zero.

    Example:
        >>> q = qsgd_quantize(torch.tensor([3.0, -4.0]), 1, torch.Generator().manual_seed(0))
        >>> set(q.abs().tolist()) <= {0.0, 5.0}, bool((q[1] <= 0).item())
        (True, True)
    """
    norm = v.norm()
    if float(norm) == 0.0:
        return torch.zeros_like(v)
    scaled = v.abs() / norm * levels
    lower = scaled.floor()
    draw = torch.rand(v.shape, generator=rng, dtype=v.dtype).to(v.device)
    level = (lower + (draw < scaled - lower).to(v.dtype)).clamp(max=levels)
    return torch.sign(v) * level * (norm / levels)


def scaled_sign(v: Tensor) -> Tensor:
    """``sign(v) * mean(|v|)`` with zeros sent as ``+`` (one bit per entry; biased).

    Example:
        >>> scaled_sign(torch.tensor([2.0, -1.0, 0.0])).tolist()
        [1.0, -1.0, 1.0]
    """
    scale = v.abs().mean() if v.numel() else v.new_zeros(())
    return torch.where(v >= 0, scale, -scale)


def qsgd_bytes(numel: int, bits: int) -> int:
    """Bytes of one QSGD tensor: a float32 norm plus ``bits + 1`` bits per entry, rounded up.

    Example:
        >>> qsgd_bytes(100, 4)  # 4 + ceil(500 / 8)
        67
    """
    return SCALAR_BYTES + math.ceil(numel * (bits + 1) / 8)


def sign_bytes(numel: int) -> int:
    """Bytes of one scaled-sign tensor: a float32 scale plus one bit per entry, rounded up.

    Example:
        >>> sign_bytes(100)
        17
    """
    return SCALAR_BYTES + math.ceil(numel / 8)


class Quantize(ClientDefense):
    """Quantised updates: QSGD (unbiased, stochastic) or scaled sign (biased, deterministic).

    ``qsgd``: Alistarh, Grubic, Li, Tomioka & Vojnovic, "QSGD: Communication-Efficient SGD via
    Gradient Quantization and Encoding" (NeurIPS 2017), per tensor with ``s = 2^bits - 1``
    levels: the norm in float32, then per entry a sign bit and a `bits`-bit level index
    (fixed-width; the paper's Elias coding would be smaller still). Unbiased.

    ``sign``: signSGD (Bernstein, Wang, Azizzadenesheli & Anandkumar, "signSGD: Compressed
    Optimisation for Non-Convex Problems", ICML 2018) with the per-tensor scale ``mean |v|``
    of scaled sign (Karimireddy, Rebjock, Stich & Jaggi, "Error Feedback Fixes SignSGD", ICML
    2019), so FedAvg's weighted mean stays meaningful. Biased, and without error feedback.
    Guarantee: none (heuristic).
    """

    name = "quantize"
    guarantee = HEURISTIC

    def __init__(self, params: QuantizeParams) -> None:
        self.params = params
        self.bits = params.bits if params.bits is not None else DEFAULT_QSGD_BITS
        self.levels = 2**self.bits - 1

    def transform(
        self, update: ClientUpdate, *, rng: torch.Generator, local: LocalData
    ) -> ClientUpdate:
        """The quantised update, with ``wire_bytes`` of the fixed-width encoding."""

        def quantise(key: str, t: Tensor) -> tuple[Tensor, int]:
            if self.params.method == "qsgd":
                return qsgd_quantize(t, self.levels, rng), qsgd_bytes(t.numel(), self.bits)
            return scaled_sign(t), sign_bytes(t.numel())

        return encode_each(update, float_keys(update), quantise)

    def describe(self) -> dict[str, Any]:
        """Settings, what the quantiser does, and why it is no guarantee."""
        if self.params.method == "qsgd":
            notes = [
                f"QSGD with {self.bits} bits ({self.levels} levels) per entry plus a sign bit and "
                "each tensor's norm: unbiased stochastic rounding",
            ]
            warnings = [
                "no formal guarantee: each tensor's norm is sent exactly and each entry is "
                f"within 1/{self.levels} of the norm of its true value; with many bits the "
                "update is close to exact",
            ]
        else:
            notes = [
                "scaled sign: each entry's sign (one bit) times its tensor's mean magnitude "
                "(biased; zeros are sent as +)",
            ]
            warnings = [
                "no formal guarantee: every sign is sent exactly; the signs of the last "
                "layer's gradient alone reveal the labels (iDLG, Zhao et al. 2020)",
            ]
        warnings.append(
            "the rounding error depends on the data and is not calibrated noise: it gives no "
            "differential privacy"
        )
        return self.entry(notes, warnings)


@CLIENT_DEFENSES.register(
    "quantize",
    summary="quantised updates: QSGD (Alistarh et al. 2017, unbiased) or scaled sign (signSGD, "
    "Bernstein et al. 2018, biased); guarantee none (heuristic)",
    params=QuantizeParams,
)
def _build_quantize(params: QuantizeParams, context: DefenseContext) -> Quantize:
    return Quantize(params)
