"""Shamir's t-of-n secret sharing (Shamir, CACM 1979) over the prime field GF(2^521 - 1).

A 32-byte secret (a mask seed, an X25519 private key) is the constant term of a random
polynomial of degree t - 1; the share of party x (x >= 1) is the polynomial at x. Any t shares
give the secret back by Lagrange interpolation at 0; fewer than t are uniformly distributed
whatever the secret. The coefficients come from the operating system's CSPRNG (``secrets``).

No maintained library on our dependency list does this for 32-byte secrets (pycryptodome's
`Shamir` shares 16-byte blocks and would be a new dependency), so this is a small field
implementation, tested against the definition.

Example:
    >>> shares = split(b"\\x07" * 32, threshold=2, xs=[1, 2, 3])
    >>> combine({x: shares[x] for x in (1, 3)}, threshold=2) == b"\\x07" * 32
    True
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1
"""The field's modulus (a Mersenne prime): every 32-byte secret is a field element."""

SHARE_BYTES = 66
"""Bytes of one share on the wire (521 bits, big-endian)."""

SECRET_BYTES = 32
"""Bytes of the secrets this module shares."""


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares of `secret` for the parties at `xs` (distinct, >= 1), any `threshold` of which
    recover it.

    Raises:
        ValueError: bad threshold, repeated or non-positive x, or a secret of the wrong size.
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and {len(xs)} (the parties)")
    if len(set(xs)) != len(xs) or min(xs) < 1:
        raise ValueError("share points must be distinct integers >= 1")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    return {x: _evaluate(coefficients, x) for x in xs}


def combine(shares: Mapping[int, int], *, threshold: int) -> bytes:
    """The secret behind `shares` (at least `threshold` of them; the first `threshold` by x
    are used).

    Raises:
        ValueError: fewer than `threshold` shares, or a share outside the field.
    """
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot recover a {threshold}-of-n secret")
    points = sorted(shares.items())[:threshold]
    if any(not 0 <= y < PRIME for _, y in points):
        raise ValueError("a share lies outside the field")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("the shares do not belong to one secret (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(share: int) -> bytes:
    """A share on the wire."""
    return share.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """A share read from the wire.

    Raises:
        ValueError: wrong length or outside the field.
    """
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ValueError("a share lies outside the field")
    return value


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """The polynomial with `coefficients` (constant first) at `x`, mod PRIME (Horner)."""
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc
