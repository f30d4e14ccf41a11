"""``ckks``: additively homomorphic aggregation with CKKS (TenSEAL over Microsoft SEAL).

Each client clips its value vector to ``±clipping_range`` (clipped entries are counted), appends
its integer statistics, packs everything into the slots of CKKS ciphertexts and uploads them.
The server adds the ciphertexts without any secret key; only the sum is ever decrypted, by the
party holding the secret key, and handed back to the server.

Two key models:

- ``authority`` (default): a key authority, a party apart from the server and the clients,
  generates the key pair. Clients receive only the public key and encrypt with it; the server
  receives only the encryption parameters, adds, and sends the summed ciphertext to the
  authority, which decrypts it. The server alone cannot decrypt, nor can any coalition of
  clients; the server colluding with the authority decrypts every update.
- ``shared``: every client holds the same secret key (the model of NVIDIA FLARE's and FedML's
  homomorphic encryption), provisioned out of band, and encrypts symmetrically (faster, less
  noise). The server sends the summed ciphertext to one client, which decrypts and returns it.
  Any client that obtains another client's ciphertext, for instance by colluding with the
  server, decrypts it.

The encoding is chosen for additions only (no multiplicative depth): one data prime holding the
scale ``2^scale_bits`` and the sum's magnitude, plus the special prime SEAL requires. With ``R``
the clipping range and ``K`` the largest cohort, the decrypted sum satisfies
``|sum| <= K * R < 2^(data_bits - scale_bits - 1)`` when
``data_bits = scale_bits + ceil(log2(K * R)) + 2``. Integer statistics are encoded as
``count * 2^-count_shift`` so that they also stay within ``±R``, and are rounded after
decryption; the encoding is refused when the CKKS noise could make that rounding wrong. The ring
degree is the smallest whose 128-bit security bound (HomomorphicEncryption.org standard, as SEAL
enforces it) admits the two primes.

Messages are bytes only: TenSEAL's serialisation of a batched ``CKKSTensor`` (one ciphertext per
column of a ``(slots, columns)`` matrix), behind a small header that binds the round and the
sender. TenSEAL crashes the process on some malformed tensors, so every received tensor is first
checked against the exact structure the server expects (see :func:`check_tensor_bytes`).
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import numpy as np
import tenseal as ts
from pydantic import BaseModel, ConfigDict, Field

from gradaudit.defenses import SERVER_DEFENSES
from gradaudit.defenses.base import DefenseContext
from gradaudit.defenses.server.base import (
    AggregationAbortedError,
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

SECURITY_BITS_128: dict[int, int] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""Largest total coefficient-modulus bits per ring degree for 128-bit classical security with a
ternary secret (HomomorphicEncryption.org standard; SEAL's ``CoeffModulus::MaxBitCount``)."""

MAX_PRIME_BITS = 60
"""SEAL's primes hold at most 60 bits."""

NOISE_STD_4096 = 2.0**10
"""Estimated standard deviation of a fresh ciphertext's noise per slot, in units of the scale,
at ring degree 4096 (measured: about 2^9.4 for public-key and 2^7.2 for symmetric encryption;
it grows linearly with the ring degree)."""

_MAGIC = b"GCKS"
_HEADER = struct.Struct("<4sBII")  # magic, version, round, client
_VERSION = 1
_STAGE = "upload"


class CkksParams(BaseModel):
    """Parameters of ``ckks``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key_model: Literal["authority", "shared"] = Field(
        "authority",
        description="authority: a key authority decrypts only the sum, clients hold the public "
        "key; shared: every client holds the secret key (NVIDIA FLARE, FedML)",
    )
    clipping_range: float = Field(
        8.0, gt=0, description="values are clipped to ±clipping_range (clipped entries counted)"
    )
    scale_bits: int = Field(
        38, ge=20, le=56, description="CKKS scale 2^scale_bits (precision about 2^-scale_bits)"
    )
    poly_modulus_degree: Literal[4096, 8192, 16384, 32768] | None = Field(
        None, description="ring degree (None: the smallest that gives 128-bit security)"
    )
    max_count: int = Field(
        65536, ge=1, description="largest magnitude of an integer statistic one client sends"
    )
    threads: int = Field(1, ge=1, description="TenSEAL threads of each party")


@dataclass(frozen=True)
class CkksEncoding:
    """How real vectors and integer statistics become CKKS slots, and back.

    Attributes:
        poly_modulus_degree: the ring degree N (N / 2 slots per ciphertext).
        coeff_mod_bit_sizes: bits of each prime; the last is SEAL's special prime, which
            ciphertexts do not carry.
        scale_bits: values are encoded at scale 2^scale_bits.
        clipping_range: values are clipped to ±clipping_range.
        count_shift: integer statistics are encoded as ``count * 2^-count_shift``.

    Example:
        >>> enc = CkksEncoding.for_sum(cohort=50, clipping_range=8.0, scale_bits=38,
        ...                            max_count=65536)
        >>> enc.poly_modulus_degree, enc.coeff_mod_bit_sizes, enc.count_shift
        (4096, (49, 49), 13)
    """

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    clipping_range: float
    count_shift: int = 0

    @classmethod
    def for_sum(
        cls,
        *,
        cohort: int,
        clipping_range: float,
        scale_bits: int,
        max_count: int,
        poly_modulus_degree: int | None = None,
    ) -> CkksEncoding:
        """The addition-only encoding whose decrypted sum of `cohort` inputs is correct.

        Raises:
            ValueError: no prime of at most 60 bits holds the sum at this scale, the ring degree
                is too small for 128-bit security, or the noise could round an integer
                statistic wrongly.
        """
        if cohort < 1:
            raise ValueError("the cohort must hold at least one client")
        headroom = math.ceil(math.log2(cohort * clipping_range)) + 2
        data_bits = max(scale_bits + headroom, 20)
        if data_bits > MAX_PRIME_BITS:
            raise ValueError(
                f"a sum of {cohort} values within ±{clipping_range} at scale 2^{scale_bits} "
                f"needs a {data_bits}-bit prime, but SEAL's primes hold at most "
                f"{MAX_PRIME_BITS} bits: lower scale_bits or clipping_range"
            )
        bits = (data_bits, data_bits)
        if poly_modulus_degree is None:
            fits = [n for n, limit in SECURITY_BITS_128.items() if sum(bits) <= limit]
            poly_modulus_degree = min(fits)
        elif sum(bits) > SECURITY_BITS_128.get(poly_modulus_degree, 0):
            raise ValueError(
                f"primes of {list(bits)} bits ({sum(bits)} in all) exceed the 128-bit security "
                f"bound of {SECURITY_BITS_128.get(poly_modulus_degree, 0)} bits for "
                f"poly_modulus_degree {poly_modulus_degree}: raise it or lower scale_bits"
            )
        count_shift = max(0, math.ceil(math.log2(max_count / clipping_range)))
        enc = cls(poly_modulus_degree, bits, scale_bits, clipping_range, count_shift)
        if enc.count_error(cohort) > 0.5:
            raise ValueError(
                f"with integer statistics up to max_count {max_count}, the CKKS noise of a sum "
                f"of {cohort} inputs at scale 2^{scale_bits} could round a count wrongly: "
                "raise scale_bits or lower max_count"
            )
        return enc

    @property
    def slots(self) -> int:
        """Values per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """The encoding scale."""
        return float(2**self.scale_bits)

    def noise_std(self, cohort: int = 1) -> float:
        """Estimated noise std of a decrypted sum of `cohort` fresh ciphertexts, per value."""
        return NOISE_STD_4096 * self.poly_modulus_degree / 4096 * math.sqrt(cohort) / self.scale

    def count_error(self, cohort: int) -> float:
        """A bound (16 noise deviations) on the error of a decoded sum of integer statistics."""
        return 16 * self.noise_std(cohort) * 2**self.count_shift

    def columns(self, n_values: int, n_counts: int) -> int:
        """Ciphertexts per input (columns of the ``(slots, columns)`` matrix); at least two,
        since TenSEAL 0.3 encrypts a batched ``(slots, 1)`` tensor wrongly."""
        return max(2, -(-(n_values + n_counts) // self.slots))

    def new_context(self, *, symmetric: bool, threads: int = 1) -> ts.Context:
        """A fresh context with a fresh secret key (from SEAL's CSPRNG)."""
        kind = ts.ENCRYPTION_TYPE.SYMMETRIC if symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
        context = ts.context(
            ts.SCHEME_TYPE.CKKS,
            self.poly_modulus_degree,
            coeff_mod_bit_sizes=list(self.coeff_mod_bit_sizes),
            encryption_type=kind,
            n_threads=threads,
        )
        context.global_scale = self.scale
        return context

    def pack(self, values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, int]:
        """The ``(slots, columns)`` matrix of one input, and how many values were clipped.

        Raises:
            ValueError: a value is NaN.
        """
        r = self.clipping_range
        if np.isnan(values).any():
            raise ValueError("the values contain NaN, which CKKS cannot encrypt")
        clipped = int(np.count_nonzero((values > r) | (values < -r)))
        cols = self.columns(values.size, counts.size)
        flat = np.zeros(self.slots * cols)
        np.clip(values, -r, r, out=flat[: values.size])
        flat[values.size : values.size + counts.size] = np.ldexp(
            counts.astype(np.float64), -self.count_shift
        )
        return flat.reshape(self.slots, cols), clipped

    def unpack(
        self, flat: np.ndarray, n_values: int, n_counts: int
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """(values, counts, the largest distance of a decoded count from an integer)."""
        values = np.array(flat[:n_values], dtype=np.float64)
        raw = np.ldexp(flat[n_values : n_values + n_counts], self.count_shift)
        counts = np.rint(raw)
        off = float(np.abs(raw - counts).max()) if n_counts else 0.0
        return values, counts.astype(np.int64), off

    def describe(self) -> dict[str, Any]:
        """The encoding's facts for the report."""
        return {
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
            "scale_bits": self.scale_bits,
            "count_shift": self.count_shift,
            "security": "128-bit classical (HomomorphicEncryption.org standard)",
        }


def encrypt(
    context: ts.Context, encoding: CkksEncoding, values: np.ndarray, counts: np.ndarray
) -> tuple[bytes, int]:
    """(TenSEAL bytes of the encrypted input, values clipped): one client's computation."""
    matrix, clipped = encoding.pack(values, counts)
    tensor = ts.ckks_tensor(context, ts.plain_tensor(matrix), batch=True)
    return tensor.serialize(), clipped


def decrypt(context: ts.Context, encoding: CkksEncoding, data: bytes, columns: int) -> np.ndarray:
    """The flat float64 slots of a batched tensor of `columns` ciphertexts; `context` must hold
    the secret key.

    Raises:
        ValueError: `data` is not such a tensor (see :func:`check_tensor_bytes`).
    """
    check_tensor_bytes(data, encoding, columns)
    try:
        tensor = ts.ckks_tensor_from(context, data)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None
    return np.array(tensor.decrypt().raw, dtype=np.float64)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("a varint is truncated")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def check_tensor_bytes(data: bytes, encoding: CkksEncoding, columns: int) -> None:
    """Check that `data` is a serialised batched ``CKKSTensor`` of exactly the expected shape.

    TenSEAL parses the tensor's protobuf and builds it without checking that the shape matches
    the ciphertexts (an empty message crashes the process), so the server checks the structure
    first: shape ``[columns]``, batch size ``slots``, the encoding's scale, and `columns`
    ciphertexts, each with a well-formed SEAL header whose size is its length. SEAL then checks
    each ciphertext against the context while loading it.

    Raises:
        ValueError: the bytes are not such a tensor (the message says why).
    """
    shape: list[int] = []
    ciphertexts = 0
    scale = batch = None
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("the tensor is truncated")
            chunk, pos = data[pos : pos + length], pos + length
            if field == 1:
                at = 0
                while at < len(chunk):
                    dim, at = _varint(chunk, at)
                    shape.append(dim)
            elif field == 2:
                _check_seal_header(chunk, ciphertexts)
                ciphertexts += 1
            else:
                raise ValueError(f"the tensor has an unexpected field {field}")
        elif wire == 1 and field == 3:
            if pos + 8 > len(data):
                raise ValueError("the tensor is truncated")
            (scale,), pos = struct.unpack_from("<d", data, pos), pos + 8
        elif wire == 0 and field in (1, 4):
            value, pos = _varint(data, pos)
            if field == 1:
                shape.append(value)
            else:
                batch = value
        else:
            raise ValueError(f"the tensor has an unexpected field {field} (wire type {wire})")
    if shape != [columns] or ciphertexts != columns or batch != encoding.slots:
        raise ValueError(
            f"the tensor holds {ciphertexts} ciphertexts of shape {shape} and batch {batch}; "
            f"expected {columns} of shape [{columns}] and batch {encoding.slots}"
        )
    if scale != encoding.scale:
        raise ValueError(f"the tensor's scale is {scale}, not 2^{encoding.scale_bits}")


def _check_seal_header(blob: bytes, index: int) -> None:
    if len(blob) < 16:
        raise ValueError(f"ciphertext {index} is truncated")
    magic, header_size, _major, _minor, compression, reserved, size = struct.unpack_from(
        "<HBBBBHQ", blob
    )
    if magic != 0xA15E or header_size != 16 or compression > 2 or reserved != 0:
        raise ValueError(f"ciphertext {index} has no valid SEAL header")
    if size != len(blob):
        raise ValueError(f"ciphertext {index} says it has {size} bytes but has {len(blob)}")


def frame(round: int, client: int, payload: bytes) -> bytes:
    """A message: the header binding `round` and `client`, then `payload`."""
    return _HEADER.pack(_MAGIC, _VERSION, round, client) + payload


def unframe(message: bytes, *, round: int, client: int) -> bytes:
    """The payload of `message`.

    Raises:
        ValueError: the header is missing, or names another round or sender.
    """
    if len(message) < _HEADER.size:
        raise ValueError(f"the message has {len(message)} bytes, fewer than its header")
    magic, version, rnd, sender = _HEADER.unpack_from(message)
    if magic != _MAGIC or version != _VERSION:
        raise ValueError("the message has no ckks header")
    if rnd != round or sender != client:
        raise ValueError(f"the message is client {sender}'s of round {rnd}")
    return message[_HEADER.size :]


class _Keys:
    """The key material of one run, generated once before the first round.

    ``authority``: the key authority keeps the secret context; clients get ``client_material``
    (the public key); the server gets ``server_material`` (parameters only).
    ``shared``: ``client_material`` holds the secret key, provisioned to every client out of
    band (never through the server); the server gets the parameters only.
    """

    def __init__(self, encoding: CkksEncoding, key_model: str, threads: int) -> None:
        self.encoding = encoding
        shared = key_model == "shared"
        secret = encoding.new_context(symmetric=shared, threads=threads)
        bare = {"save_galois_keys": False, "save_relin_keys": False}
        self._authority = None if shared else secret
        self.client_material = secret.serialize(
            save_public_key=not shared, save_secret_key=shared, **bare
        )
        self.server_material = secret.serialize(
            save_public_key=False, save_secret_key=False, **bare
        )

    def authority_decrypt(self, data: bytes, columns: int) -> np.ndarray:
        """The key authority decrypts the summed tensor of `columns` ciphertexts it was sent.

        Raises:
            ProtocolError: there is no authority (shared key model), or `data` is malformed.
        """
        if self._authority is None:
            raise ProtocolError("there is no key authority under the shared key model")
        try:
            return decrypt(self._authority, self.encoding, data, columns)
        except ValueError as exc:
            raise ProtocolError(
                f"stage {_STAGE!r}: the key authority refused the sum: {exc}"
            ) from None


class Ckks(AggregationProtocol):
    """CKKS aggregation: the server adds ciphertexts and learns only the decrypted sum.

    The keys are generated once, before the first round (by the key authority, or under
    ``shared`` by the party that provisions the clients); that time counts in the first round's
    ``server_seconds``, as do the server's deserialisation and additions and the authority's
    decryption. ``client_seconds`` counts every client's packing, encryption and serialisation,
    and under ``shared`` the decrypting client's work.

    Args:
        params: the validated parameters.
        max_cohort: the most clients one round sums (bounds the encoding).

    Attributes:
        encoding: the CKKS encoding chosen for `max_cohort`.
        expansion: bytes on the wire per float32 byte of the values in the last round's uploads
            (None before the first round).
        authority_bytes: bytes exchanged with the key authority in the last round.

    Raises:
        ValueError: the parameters admit no secure encoding for `max_cohort` (see
            :meth:`CkksEncoding.for_sum`).
    """

    name: ClassVar[str] = "ckks"
    visibility: ClassVar[Visibility] = Visibility.AGGREGATE_ONLY
    stages: ClassVar[tuple[str, ...]] = (_STAGE,)

    def __init__(self, params: CkksParams, max_cohort: int) -> None:
        self.params = params
        self.max_cohort = max_cohort
        self.encoding = CkksEncoding.for_sum(
            cohort=max_cohort,
            clipping_range=params.clipping_range,
            scale_bits=params.scale_bits,
            max_count=params.max_count,
            poly_modulus_degree=params.poly_modulus_degree,
        )
        if params.key_model == "authority":
            self.guarantee = (
                "The server sees each update only as a CKKS ciphertext (128-bit security) and "
                "learns the decrypted sum; holds against the server and any coalition of "
                "clients, while the key authority does not collude with the server"
            )
        else:
            self.guarantee = (
                "The server sees each update only as a CKKS ciphertext (128-bit security) and "
                "learns the decrypted sum; holds only while no client colludes with the server, "
                "since every client holds the secret key"
            )
        self.expansion: float | None = None
        self.authority_bytes = 0
        self._keys: _Keys | None = None
        self._client_context: ts.Context | None = None
        self._server_context: ts.Context | None = None
        self._provisioned: set[int] = set()

    @property
    def client_context(self) -> ts.Context:
        """The context a client holds (public key only under ``authority``)."""
        self._setup()
        assert self._client_context is not None
        return self._client_context

    @property
    def server_context(self) -> ts.Context:
        """The context the server holds: the encryption parameters, no key."""
        self._setup()
        assert self._server_context is not None
        return self._server_context

    @property
    def client_material(self) -> bytes:
        """The serialised context each client receives."""
        self._setup()
        assert self._keys is not None
        return self._keys.client_material

    def _setup(self) -> float:
        """Generate the keys once; the seconds it took (0 after the first call)."""
        if self._keys is not None:
            return 0.0
        start = time.perf_counter()
        threads = self.params.threads
        self._keys = _Keys(self.encoding, self.params.key_model, threads)
        self._client_context = ts.context_from(self._keys.client_material, n_threads=threads)
        self._server_context = ts.context_from(self._keys.server_material, n_threads=threads)
        return time.perf_counter() - start

    def encrypt(self, contribution: Contribution, *, round: int) -> tuple[bytes, int]:
        """One client's upload for `round` and how many of its values were clipped.

        Raises:
            ValueError: a value is NaN, or a statistic exceeds ``max_count``.
        """
        counts = np.asarray(contribution.counts, dtype=np.int64)
        cid = contribution.client_id
        if counts.size and int(np.abs(counts).max()) > self.params.max_count:
            raise ValueError(
                f"client {cid}'s integer statistics {counts.tolist()} exceed max_count "
                f"{self.params.max_count}; raise the ckks parameter max_count"
            )
        try:
            payload, clipped = encrypt(
                self.client_context,
                self.encoding,
                np.asarray(contribution.values, dtype=np.float64),
                counts,
            )
        except ValueError as exc:
            raise ValueError(f"client {cid}: {exc}") from None
        return frame(round, cid, payload), clipped

    def _receive(self, client: int, message: bytes, *, round: int, columns: int) -> ts.CKKSTensor:
        """The server deserialises one client's upload (parameters only, no key)."""
        try:
            payload = unframe(message, round=round, client=client)
            check_tensor_bytes(payload, self.encoding, columns)
            return ts.ckks_tensor_from(self.server_context, payload)
        except (ValueError, RuntimeError) as exc:  # SEAL's load raises either
            raise ProtocolError(f"client {client}, stage {_STAGE!r}: {exc}") from None

    def secure_sum(
        self,
        contributions: Sequence[Contribution],
        *,
        round: int,
        cohort: int,
        network: Any,
    ) -> SecureSum:
        """The decrypted sum of the uploads that reach the server (see the module docstring).

        Raises:
            ValueError: more inputs than the encoding was chosen for, inputs of different sizes,
                or an input CKKS cannot encode.
            ProtocolError: a message is malformed.
            AggregationAbortedError: no upload reached the server, or (shared key model) no
                client remained to decrypt the sum.
        """
        n_values, n_counts = check_contributions(
            contributions, round=round, cohort=cohort, limit=self.max_cohort, name="ckks"
        )
        columns = self.encoding.columns(n_values, n_counts)
        server_seconds = self._setup()

        if self.params.key_model == "authority":
            ids = [c.client_id for c in contributions]
            provision(network, _STAGE, self.client_material, ids, self._provisioned)

        client_seconds = 0.0
        uploads: dict[int, bytes] = {}
        clipped: dict[int, int] = {}
        for contribution in contributions:
            start = time.perf_counter()
            uploads[contribution.client_id], clipped[contribution.client_id] = self.encrypt(
                contribution, round=round
            )
            client_seconds += time.perf_counter() - start
        if n_values:
            sizes = sum(len(m) for m in uploads.values())
            self.expansion = sizes / (4 * n_values * len(uploads))

        arrived, included, dropped = collect_uploads(
            network, _STAGE, uploads, round=round, name="ckks"
        )
        del uploads

        start = time.perf_counter()
        total = None
        for cid in included:
            tensor = self._receive(cid, arrived[cid], round=round, columns=columns)
            if total is None:
                total = tensor
            else:
                try:
                    total.add_(tensor)
                except (ValueError, RuntimeError) as exc:
                    raise ProtocolError(f"client {cid}, stage {_STAGE!r}: {exc}") from None
        assert total is not None
        summed = total.serialize()
        server_seconds += time.perf_counter() - start

        if self.params.key_model == "authority":
            start = time.perf_counter()
            flat = self._keys.authority_decrypt(summed, columns)  # type: ignore[union-attr]
            server_seconds += time.perf_counter() - start
            self.authority_bytes = len(summed) + 8 * flat.size
        else:
            flat, seconds = self._shared_decrypt(summed, included, round, network, columns)
            client_seconds += seconds

        values, counts, off = self.encoding.unpack(flat, n_values, n_counts)
        if off > 0.25:
            raise ProtocolError(
                f"stage {_STAGE!r}: a decrypted sum of integer statistics is {off:.3f} away from "
                "an integer: some client encoded a non-integer count, or the noise exceeded its "
                "estimate"
            )
        stages = tuple(
            replace(s, clients=len(included)) if s.stage == _STAGE else s for s in network.costs()
        )
        return SecureSum(
            values=values,
            counts=counts,
            included=included,
            dropped=dropped,
            clipped=sum(clipped[c] for c in included),
            stages=stages,
            client_seconds=client_seconds,
            server_seconds=server_seconds,
        )

    def _shared_decrypt(
        self, summed: bytes, included: tuple[int, ...], round: int, network: Any, columns: int
    ) -> tuple[np.ndarray, float]:
        """Shared key model: the first reachable included client decrypts the sum and returns it
        (float64 little-endian); (the sum, the decrypting client's seconds)."""
        seconds = 0.0
        for cid in included:
            if not network.send_down(_STAGE, {cid: summed}):
                continue
            start = time.perf_counter()
            try:
                flat = decrypt(self.client_context, self.encoding, summed, columns)
            except ValueError as exc:
                raise ProtocolError(
                    f"client {cid}, stage {_STAGE!r}: the server's sum is malformed: {exc}"
                ) from None
            reply = frame(round, cid, flat.astype("<f8").tobytes())
            seconds += time.perf_counter() - start
            back = network.deliver(_STAGE, {cid: reply})
            if cid not in back:
                continue
            try:
                payload = unframe(back[cid], round=round, client=cid)
                if len(payload) != 8 * self.encoding.slots * columns:
                    raise ValueError(f"the decrypted sum has {len(payload)} bytes")
            except ValueError as exc:
                raise ProtocolError(f"client {cid}, stage {_STAGE!r}: {exc}") from None
            return np.frombuffer(payload, dtype="<f8").astype(np.float64), seconds
        raise AggregationAbortedError(
            f"round {round}: no client holding the shared ckks key remained to decrypt the sum"
        )

    def notes(self) -> list[str]:
        """The key model's trust assumption, the encoding and what CKKS does not promise."""
        if self.params.key_model == "authority":
            trust = (
                "Key model authority: a key authority, apart from the server and the clients, "
                "holds the only secret key and decrypts only the summed ciphertext the server "
                "sends it; clients hold the public key and cannot decrypt each other's uploads, "
                "the server alone cannot decrypt, but the server colluding with the authority "
                "decrypts every update."
            )
        else:
            trust = (
                "Key model shared (as in NVIDIA FLARE and FedML): every client holds the same "
                "secret key, provisioned out of band, and one of them decrypts the sum for the "
                "server; any client that obtains another client's ciphertext, for instance by "
                "colluding with the server, decrypts that client's update."
            )
        enc = self.encoding
        return [
            trust,
            f"Encoding for additions only: ring degree {enc.poly_modulus_degree}, primes "
            f"{list(enc.coeff_mod_bit_sizes)} bits, scale 2^{enc.scale_bits}, 128-bit security "
            "(HomomorphicEncryption.org standard); values are clipped to "
            f"±{enc.clipping_range} (clipped entries are counted) so that a sum of "
            f"{self.max_cohort} inputs cannot wrap; integer statistics up to "
            f"{self.params.max_count} are recovered exactly.",
            "CKKS is approximate and not reproducible bit for bit: SEAL draws the keys and the "
            "encryption noise from its own CSPRNG, not from the scenario seed, so each decrypted "
            f"sum carries noise of about {enc.noise_std(self.max_cohort):.1e} per value that "
            "differs from run to run.",
            "DP hybrid: clip and noise each update on the client (dp_gaussian at level client "
            "with noise: distributed, or level local) before encrypting; the server then never "
            "sees an unnoised individual update, and the sum it decrypts carries the noise.",
            "Honest-but-curious model: the server and clients follow the protocol; nothing proves "
            "that a client's ciphertext encrypts an in-range update, so a malicious client can "
            "skew the sum unnoticed, and messages are bound to their round and sender but not "
            "authenticated.",
        ]

    def describe(self) -> dict[str, Any]:
        """The report entry, with the encoding and the measured ciphertext expansion."""
        entry = super().describe()
        if self.params.key_model == "shared":
            entry["warnings"].append(
                "ckks key_model shared: every client holds the secret key; a client colluding "
                "with the server decrypts every individual update."
            )
        entry["encoding"] = self.encoding.describe()
        entry["ciphertext_expansion"] = self.expansion
        return entry


@SERVER_DEFENSES.register(
    "ckks",
    summary="CKKS homomorphic encryption (TenSEAL): the server adds ciphertexts and learns "
    "only the decrypted sum",
    params=CkksParams,
)
def build_ckks(params: CkksParams, context: DefenseContext) -> Ckks:
    """The ``ckks`` protocol sized for the federation's largest cohort."""
    return Ckks(params, max_cohort(context))
