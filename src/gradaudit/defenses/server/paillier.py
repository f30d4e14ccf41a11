"""``paillier``: the integer statistics summed under Paillier encryption (python-paillier).

Paillier's cryptosystem (Paillier, "Public-Key Cryptosystems Based on Composite Degree
Residuosity Classes", EUROCRYPT 1999) is additively homomorphic: with public modulus ``n`` and
``g = n + 1``, ``E(m) = (1 + m n) r^n mod n^2``, and ``E(a) E(b) mod n^2`` decrypts to
``a + b mod n``. It suits a few exact integers, not a million floats: one 2048-bit key costs
two 4096-bit modular exponentiations per encrypted number.

So this protocol protects only the integer statistics of each contribution (the example counts
FedAvg weights by, the unclipped bit of adaptive clipping): a key authority, apart from the
server, generates the key pair; each client encrypts each statistic with the public key; the
server multiplies the ciphertexts and sends only their product to the authority, which decrypts
the sum. The value vector is not encrypted: it travels as float32 (lossless for the float32
tensors of a model) and the server sums it in the clear, so the server still sees every
individual update and the protocol's visibility stays ``individual``.

A statistic ``m`` is encrypted as ``m mod n``; a decrypted sum above ``n / 2`` stands for a
negative number. Statistics are int64, so a sum over fewer than ``2^(key_length - 66)`` clients
cannot wrap.

Messages are bytes in a strict format (never pickle): a header binding the magic, version, round
and sender, then the float32 values, then each ciphertext as a fixed-width big-endian integer of
``ceil(2 key_length / 8)`` bytes. A message of any other length, or a ciphertext outside
``(0, n^2)`` or sharing a factor with ``n``, is a :class:`ProtocolError`.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
from phe import paillier
from pydantic import BaseModel, ConfigDict, Field

from gradaudit.defenses import SERVER_DEFENSES
from gradaudit.defenses.base import DefenseContext
from gradaudit.defenses.server.base import (
    AggregationProtocol,
    Contribution,
    ProtocolError,
    SecureSum,
    check_contributions,
    collect_uploads,
    max_cohort,
    provision,
)
from gradaudit.types import Visibility

_MAGIC = b"GPLR"
_HEADER = struct.Struct("<4sBIIII")  # magic, version, round, client, values, counts
_VERSION = 1
_STAGE = "upload"


class PaillierParams(BaseModel):
    """Parameters of ``paillier``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_length: int = Field(
        2048, ge=1024, le=8192, description="bits of the Paillier modulus n (2048: ~112-bit)"
    )


def ciphertext_width(public_key: paillier.PaillierPublicKey) -> int:
    """Bytes of one serialised ciphertext (an integer below n^2)."""
    return (public_key.nsquare.bit_length() + 7) // 8


def check_ciphertext(public_key: paillier.PaillierPublicKey, ciphertext: int) -> None:
    """Check that `ciphertext` is a valid Paillier ciphertext under `public_key`.

    Raises:
        ValueError: it is not in ``(0, n^2)`` or shares a factor with ``n`` (no encryption
            does; such a number would reveal a factor of ``n`` when decrypted).
    """
    if not 0 < ciphertext < public_key.nsquare:
        raise ValueError("a ciphertext lies outside (0, n^2)")
    if math.gcd(ciphertext, public_key.n) != 1:
        raise ValueError("a ciphertext shares a factor with n")


def paillier_sum(public_key: paillier.PaillierPublicKey, ciphertexts: Iterable[int]) -> int:
    """The ciphertext of the sum of the plaintexts of `ciphertexts` (raw integers, as
    ``EncryptedNumber.ciphertext()`` gives them): their product modulo ``n^2``.

    An empty sum gives 1, the encryption of 0 with ``r = 1``.

    Raises:
        ValueError: a ciphertext is not valid under `public_key` (:func:`check_ciphertext`).

    Example:
        >>> pub, priv = paillier.generate_paillier_keypair(n_length=512)
        >>> c = paillier_sum(pub, [pub.raw_encrypt(20), pub.raw_encrypt(22)])
        >>> priv.raw_decrypt(c)
        42
    """
    total = 1
    for ciphertext in ciphertexts:
        check_ciphertext(public_key, ciphertext)
        total = total * ciphertext % public_key.nsquare
    return total


def encode_signed(public_key: paillier.PaillierPublicKey, value: int) -> int:
    """The plaintext of a signed integer: ``value mod n``."""
    return int(value) % public_key.n


def decode_signed(public_key: paillier.PaillierPublicKey, plaintext: int) -> int:
    """The signed integer a plaintext stands for (above n / 2: negative)."""
    return plaintext - public_key.n if plaintext > public_key.n // 2 else plaintext


class _KeyAuthority:
    """Holds the private key (from the OS's CSPRNG, via phe) and decrypts only sums."""

    def __init__(self, key_length: int) -> None:
        self.public_key, self._private_key = paillier.generate_paillier_keypair(n_length=key_length)

    def decrypt_sums(self, ciphertexts: Sequence[int]) -> list[int]:
        """The signed plaintexts of the summed ciphertexts the server sent."""
        out = []
        for ciphertext in ciphertexts:
            check_ciphertext(self.public_key, ciphertext)
            plain = self._private_key.raw_decrypt(ciphertext)
            out.append(decode_signed(self.public_key, plain))
        return out


class Paillier(AggregationProtocol):
    """Paillier-encrypted integer statistics; the values are summed in the clear.

    Args:
        params: the validated parameters.
        max_cohort: the most clients one round sums.

    Attributes:
        public_key: the authority's public key (None before the first round).
        authority_bytes: bytes exchanged with the key authority in the last round.
    """

    name: ClassVar[str] = "paillier"
    visibility: ClassVar[Visibility] = Visibility.INDIVIDUAL
    stages: ClassVar[tuple[str, ...]] = (_STAGE,)
    guarantee = (
        "none for the updates: protects only the integer statistics (the server learns only "
        "their sum, while the key authority does not collude with it); the server still sees "
        "each update"
    )

    def __init__(self, params: PaillierParams, max_cohort: int) -> None:
        if max_cohort.bit_length() + 66 > params.key_length:
            raise ValueError(f"a {params.key_length}-bit key cannot sum {max_cohort} statistics")
        self.params = params
        self.max_cohort = max_cohort
        self.public_key: paillier.PaillierPublicKey | None = None
        self.authority_bytes = 0
        self._authority: _KeyAuthority | None = None
        self._provisioned: set[int] = set()

    def _setup(self) -> float:
        """Generate the key pair once; the seconds it took (0 after the first call)."""
        if self._authority is not None:
            return 0.0
        start = time.perf_counter()
        self._authority = _KeyAuthority(self.params.key_length)
        self.public_key = self._authority.public_key
        return time.perf_counter() - start

    @property
    def key_bytes(self) -> bytes:
        """The public key as clients receive it: n, big-endian."""
        self._setup()
        assert self.public_key is not None
        n = self.public_key.n
        return n.to_bytes((n.bit_length() + 7) // 8, "big")

    def encode(self, contribution: Contribution, *, round: int) -> bytes:
        """One client's upload: header, float32 values, encrypted statistics."""
        self._setup()
        pub = self.public_key
        assert pub is not None
        values = np.asarray(contribution.values, dtype="<f4")
        counts = np.asarray(contribution.counts, dtype=np.int64)
        width = ciphertext_width(pub)
        header = _HEADER.pack(
            _MAGIC, _VERSION, round, contribution.client_id, values.size, counts.size
        )
        encrypted = b"".join(
            pub.raw_encrypt(encode_signed(pub, int(c))).to_bytes(width, "big") for c in counts
        )
        return header + values.tobytes() + encrypted

    def decode(
        self, client: int, message: bytes, *, round: int, n_values: int, n_counts: int
    ) -> tuple[np.ndarray, list[int]]:
        """The server's parse of one upload: (float64 values, raw ciphertexts).

        Raises:
            ProtocolError: the message is malformed, names another round or sender, or holds
                an invalid ciphertext.
        """
        pub = self.public_key
        assert pub is not None
        width = ciphertext_width(pub)
        try:
            expected = _HEADER.size + 4 * n_values + width * n_counts
            if len(message) != expected:
                raise ValueError(f"the message has {len(message)} bytes, not {expected}")
            magic, version, rnd, sender, nv, nc = _HEADER.unpack_from(message)
            if magic != _MAGIC or version != _VERSION:
                raise ValueError("the message has no paillier header")
            if (rnd, sender, nv, nc) != (round, client, n_values, n_counts):
                raise ValueError(
                    f"the header says round {rnd}, client {sender}, {nv} values and {nc} "
                    f"statistics; expected round {round}, client {client}, {n_values} and "
                    f"{n_counts}"
                )
            start = _HEADER.size + 4 * n_values
            values = np.frombuffer(message, dtype="<f4", count=n_values, offset=_HEADER.size)
            ciphertexts = [
                int.from_bytes(message[start + i * width : start + (i + 1) * width], "big")
                for i in range(n_counts)
            ]
            for ciphertext in ciphertexts:
                check_ciphertext(pub, ciphertext)
        except ValueError as exc:
            raise ProtocolError(f"client {client}, stage {_STAGE!r}: {exc}") from None
        return values.astype(np.float64), ciphertexts

    def secure_sum(
        self,
        contributions: Sequence[Contribution],
        *,
        round: int,
        cohort: int,
        network: Any,
    ) -> SecureSum:
        """The sum of the uploads that reach the server; the statistics under encryption.

        Raises:
            ValueError: more inputs than `max_cohort`, or inputs of different sizes.
            ProtocolError: a message is malformed.
            AggregationAbortedError: no upload reached the server.
        """
        n_values, n_counts = check_contributions(
            contributions, round=round, cohort=cohort, limit=self.max_cohort, name="paillier"
        )
        server_seconds = self._setup()
        pub = self.public_key
        assert pub is not None

        ids = [c.client_id for c in contributions]
        provision(network, _STAGE, self.key_bytes, ids, self._provisioned)

        client_seconds = 0.0
        uploads: dict[int, bytes] = {}
        for contribution in contributions:
            start = time.perf_counter()
            uploads[contribution.client_id] = self.encode(contribution, round=round)
            client_seconds += time.perf_counter() - start

        arrived, included, dropped = collect_uploads(
            network, _STAGE, uploads, round=round, name="paillier"
        )

        start = time.perf_counter()
        values = np.zeros(n_values)
        columns: list[list[int]] = [[] for _ in range(n_counts)]
        for cid in included:
            vals, ciphertexts = self.decode(
                cid, arrived[cid], round=round, n_values=n_values, n_counts=n_counts
            )
            values += vals
            for column, ciphertext in zip(columns, ciphertexts, strict=True):
                column.append(ciphertext)
        sums = [paillier_sum(pub, column) for column in columns]
        assert self._authority is not None
        counts = np.array(self._authority.decrypt_sums(sums), dtype=np.int64)
        server_seconds += time.perf_counter() - start
        width = ciphertext_width(pub)
        self.authority_bytes = width * n_counts + 8 * n_counts

        return SecureSum(
            values=values,
            counts=counts,
            included=included,
            dropped=dropped,
            stages=network.costs(),
            client_seconds=client_seconds,
            server_seconds=server_seconds,
        )

    def notes(self) -> list[str]:
        """What the protocol protects, and whom it trusts."""
        return [
            "Paillier protects only the integer statistics (example counts, clipped bits): the "
            "server still sees each client's update in the clear, so this protocol does not "
            "defend against gradient inversion at all; use ckks or secure aggregation for that.",
            "Key authority: a party apart from the server generates the "
            f"{self.params.key_length}-bit key pair and decrypts only the product of the "
            "ciphertexts the server sends it; clients hold the public key; the server colluding "
            "with the authority learns each client's statistics.",
            "Honest-but-curious model: nothing proves that a client encrypted an honest "
            "statistic, and messages are bound to their round and sender but not authenticated.",
        ]

    def describe(self) -> dict[str, Any]:
        """The report entry, with what stays in the clear."""
        entry = super().describe()
        entry["warnings"].append(
            "paillier protects only the integer statistics; the server still sees each update."
        )
        entry["encrypted"] = "integer statistics only"
        return entry


@SERVER_DEFENSES.register(
    "paillier",
    summary="Paillier encryption of the integer statistics (example counts) only; the updates "
    "stay visible to the server",
    params=PaillierParams,
)
def build_paillier(params: PaillierParams, context: DefenseContext) -> Paillier:
    """The ``paillier`` protocol."""
    return Paillier(params, max_cohort(context))
