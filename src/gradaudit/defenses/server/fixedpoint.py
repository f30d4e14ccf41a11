"""Fixed-point encoding of real vectors into the ring Z_(2^bits), and back, without wrapping.

Secure aggregation adds integers modulo 2^bits. A real value x in [-R, R] becomes
``round(x * scale)``; with ``scale = floor((2^(bits-1) - 1) / (cohort * R))`` the sum of up to
`cohort` encoded values stays inside the signed range, so the decoded sum is exactly the sum of
the encoded inputs. Values outside [-R, R] are clipped to the range and counted, never wrapped.
Integer statistics (counts) are encoded as they are, bounded so their sum cannot wrap either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FixedPoint:
    """The encoding of one round.

    Attributes:
        clipping_range: R, the largest magnitude a value keeps.
        cohort: the most inputs that will be summed.
        bits: the ring's width (32: 4 bytes per entry on the wire).

    Example:
        >>> fp = FixedPoint(clipping_range=1.0, cohort=2, bits=32)
        >>> enc, clipped = fp.encode(np.array([0.25, -3.0]))
        >>> clipped
        1
        >>> fp.decode(fp.add(enc, enc)).round(6).tolist()
        [0.5, -2.0]
    """

    clipping_range: float
    cohort: int
    bits: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (32, 64):
            raise ValueError("bits must be 32 or 64")
        if self.clipping_range <= 0:
            raise ValueError("clipping_range must be positive")
        if self.scale < 1:
            raise ValueError(
                f"a {self.bits}-bit ring cannot sum {self.cohort} values of magnitude "
                f"{self.clipping_range}: lower clipping_range or use 64 bits"
            )

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        """The unsigned dtype of ring elements."""
        return np.uint32 if self.bits == 32 else np.uint64

    @property
    def scale(self) -> int:
        """Ring units per 1.0 (the precision is ``1 / scale``)."""
        return int((2 ** (self.bits - 1) - 1) // (self.cohort * self.clipping_range))

    @property
    def max_count(self) -> int:
        """The largest integer statistic one input may carry."""
        return (2 ** (self.bits - 1) - 1) // self.cohort

    def encode(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        """(ring elements of `values`, how many were clipped to the range)."""
        r = self.clipping_range
        clipped = int(np.count_nonzero(np.abs(values) > r))
        scaled = np.clip(values, -r, r)
        scaled *= self.scale
        np.rint(scaled, out=scaled)
        signed = np.int32 if self.bits == 32 else np.int64
        # |scaled| < 2^(bits-1): the signed cast is exact; two's complement makes -1 2^bits - 1
        return scaled.astype(signed).view(self.dtype), clipped

    def encode_counts(self, counts: np.ndarray) -> np.ndarray:
        """Ring elements of integer statistics.

        Raises:
            ValueError: a statistic is negative or too large to be summed without wrapping.
        """
        counts = np.asarray(counts, dtype=np.int64)
        if counts.size and (counts.min() < 0 or counts.max() > self.max_count):
            raise ValueError(
                f"an integer statistic outside [0, {self.max_count}] cannot be summed over "
                f"{self.cohort} clients in a {self.bits}-bit ring"
            )
        return counts.astype(self.dtype)

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """``a + b`` in the ring (a new array)."""
        return np.add(a, b, dtype=self.dtype)

    def signed(self, ring: np.ndarray) -> np.ndarray:
        """The ring elements as signed integers (int64)."""
        signed = np.int32 if self.bits == 32 else np.int64
        return ring.astype(self.dtype).view(signed).astype(np.int64)

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """The real values a sum of encoded inputs stands for."""
        return self.signed(ring).astype(np.float64) / self.scale
