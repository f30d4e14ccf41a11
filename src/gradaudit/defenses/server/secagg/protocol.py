"""Secure aggregation: Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving
Machine Learning", CCS 2017, with the sparse share graph of SecAgg+ (Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020).

One round, between the server and the clients that finished training, in five stages (a client
may vanish at any of them):

1. ``advertise_keys``: each client makes two X25519 key pairs (one to encrypt shares, one to
   agree masks) and sends their public halves, signed with its long-term Ed25519 identity key,
   so the server cannot substitute keys (a PKI gives every party the identity keys).
2. ``share_keys``: each client verifies its neighbours' signed keys, draws a self-mask seed
   ``b``, splits ``b`` and its mask private key t-of-k (Shamir) among its share group, and
   sends each neighbour's shares encrypted with AES-GCM under an X25519/HKDF key; the server
   relays ciphertexts it cannot read.
3. ``masked_input``: each client encodes its contribution in fixed point (clipping out-of-range
   values and counting them, never wrapping) and adds its self mask and, for every neighbour
   that shared, a pairwise mask (added if its id is smaller, subtracted if larger), all
   AES-CTR keystreams: 4 bytes per entry travel for a 32-bit ring.
4. ``consistency``: the server tells each client which members of its share group sent a
   masked input; each client signs that list, and before it reveals anything every client
   checks that t of its neighbours signed lists that agree with its own wherever their groups
   overlap (the malicious-server check of Bonawitz et al., Sec. 4, kept within share groups so
   a client's work stays independent of the cohort)
5. ``unmasking``: for each neighbour, a client reveals the share of its self-mask seed if the
   neighbour's input arrived, or of its mask key if it did not; asked for both of one
   neighbour, it refuses. The server rebuilds the secrets, strips the masks and decodes the sum.

Below t answers for any secret the server needs, the round aborts before anything is rebuilt:
the server learns no sum and no input. SecAgg+ shares among ``neighbours`` clients on a ring in
random order (itself and (neighbours-1)/2 on each side), so a client's work does not grow with
the cohort; without ``neighbours`` every client shares with every other (Bonawitz et al.).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gradaudit.defenses import SERVER_DEFENSES
from gradaudit.defenses.server.base import (
    AggregationAbortedError,
    AggregationProtocol,
    Contribution,
    ProtocolError,
    SecureSum,
    check_contributions,
)
from gradaudit.defenses.server.fixedpoint import FixedPoint
from gradaudit.defenses.server.secagg import shamir
from gradaudit.defenses.server.secagg.masks import MaskExpander, derive_key
from gradaudit.defenses.server.secagg.wire import (
    Expect,
    get_field,
    hex_field,
    pack,
    pack_list,
    peek_sender,
    unpack,
    unpack_list,
)
from gradaudit.types import Visibility

logger = logging.getLogger(__name__)

STAGES = ("advertise_keys", "share_keys", "masked_input", "consistency", "unmasking")
SERVER = -1
_KEY = 32


class SecAggParams(BaseModel):
    """Parameters of `secagg`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    neighbours: int | None = Field(
        None,
        ge=3,
        description="SecAgg+ share group per client, itself included (odd); null: every client "
        "of the round (the complete graph of Bonawitz et al.)",
    )
    threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of a client's share group needed to rebuild its secrets: the "
        "server must collude with this many clients to unmask one input, and this many must "
        "stay online",
    )
    clipping_range: float = Field(
        8.0, gt=0, description="values are clipped to [-clipping_range, clipping_range]"
    )
    bits: Literal[32, 64] = Field(32, description="ring width: bytes per entry on the wire x 8")

    @field_validator("neighbours")
    @classmethod
    def _odd(cls, value: int | None) -> int | None:
        if value is not None and value % 2 == 0:
            raise ValueError(
                f"neighbours must be odd (the client and as many on each side of it); use "
                f"{value + 1} or {value - 1}"
            )
        return value


def share_groups(clients: Sequence[int], size: int | None) -> dict[int, tuple[int, ...]]:
    """Each client's share group: itself and ``(size - 1) / 2`` clients on each side of it on a
    ring in random order (every client when `size` is None or covers the cohort).

    The order is drawn from the operating system's CSPRNG; the graph is symmetric (v is in u's
    group exactly when u is in v's).
    """
    clients = list(clients)
    n = len(clients)
    if size is None or size >= n:
        everyone = tuple(sorted(clients))
        return dict.fromkeys(clients, everyone)
    order = clients[:]
    random.SystemRandom().shuffle(order)
    half = (size - 1) // 2
    return {
        order[i]: tuple(sorted({order[(i + d) % n] for d in range(-half, half + 1)}))
        for i in range(n)
    }


def threshold_count(fraction: float, group: int) -> int:
    """Shares needed of a group of `group` (at least 2 when the group allows: one answer must
    never unmask a client)."""
    return min(group, max(2, math.ceil(fraction * group)))


def _public_bytes(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _aad(session: bytes, rnd: int, sender: int, recipient: int) -> bytes:
    return session + f"|{rnd}|{sender}|{recipient}".encode()


@dataclass
class SecAggClient:
    """One client's side of a round. Holds its secrets; speaks only through bytes.

    Args:
        client_id: the client.
        identity: its long-term Ed25519 signing key.
        directory: every party's Ed25519 public key (the PKI).
        values: its fixed-point-encodable values.
        counts: its integer statistics.
    """

    client_id: int
    identity: Ed25519PrivateKey
    directory: Mapping[int, Ed25519PublicKey]
    values: np.ndarray
    counts: np.ndarray
    session: bytes = b""
    round: int = 0
    group: tuple[int, ...] = ()
    threshold: int = 0
    fixed: FixedPoint | None = None
    _c_key: X25519PrivateKey | None = None
    _s_key: X25519PrivateKey | None = None
    _roster: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    _held: dict[int, tuple[int, int]] = field(default_factory=dict)
    _signed: tuple[int, ...] | None = None
    _revealed: dict[int, str] = field(default_factory=dict)
    _b: bytes = b""

    def _expect(self, stage: str, sender: int = SERVER) -> Expect:
        return Expect(self.session, self.round, stage, sender)

    def _mine(self, stage: str) -> Expect:
        return Expect(self.session, self.round, stage, self.client_id)

    def advertise(self, setup: bytes, *, session: bytes, rnd: int) -> bytes:
        """Stage 1: read the round's setup; send two signed X25519 public keys."""
        self.session, self.round = session, rnd
        expect = self._expect("advertise_keys")
        header, _ = unpack(setup, expect)
        where = expect.where()
        group = get_field(header, "group", list, where)
        if self.client_id not in group or any(not isinstance(g, int) for g in group):
            raise ProtocolError(f"{where}: the share group does not hold this client")
        self.group = tuple(sorted(set(group)))
        self.threshold = get_field(header, "threshold", int, where)
        if not 2 <= self.threshold <= len(self.group) and len(self.group) > 1:
            raise ProtocolError(f"{where}: threshold {self.threshold} is unsafe for the group")
        self.fixed = FixedPoint(
            float(get_field(header, "clipping_range", float, where)),
            get_field(header, "cohort", int, where),
            get_field(header, "bits", int, where),
        )
        self._c_key, self._s_key = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        return pack(
            self._mine("advertise_keys"),
            {
                "c_pk": _public_bytes(self._c_key.public_key()).hex(),
                "s_pk": _public_bytes(self._s_key.public_key()).hex(),
            },
            signer=self.identity,
        )

    def share_keys(self, roster: bytes) -> bytes:
        """Stage 2: verify the neighbours' signed keys; send them shares of b and of s_sk."""
        expect = self._expect("share_keys")
        _, body = unpack(roster, expect)
        where = expect.where()
        for advert in unpack_list(body, where):
            sender = peek_sender(advert, where)
            if sender not in self.group or sender in self._roster:
                raise ProtocolError(f"{where}: client {sender} is not a (new) neighbour")
            key = self.directory.get(sender)
            if key is None:
                raise ProtocolError(f"{where}: client {sender} has no identity key")
            inner = Expect(self.session, self.round, "advertise_keys", sender)
            header, _ = unpack(advert, inner, verify=key)
            self._roster[sender] = (
                hex_field(header, "c_pk", _KEY, inner.where()),
                hex_field(header, "s_pk", _KEY, inner.where()),
            )
        assert self._c_key is not None and self._s_key is not None
        own = (_public_bytes(self._c_key.public_key()), _public_bytes(self._s_key.public_key()))
        if self._roster.get(self.client_id) != own:
            raise ProtocolError(f"{where}: the roster does not carry this client's own keys")
        if len(self._roster) < self.threshold:
            raise ProtocolError(
                f"{where}: {len(self._roster)} neighbours advertised keys; {self.threshold} "
                "are needed"
            )
        self._b = os.urandom(_KEY)
        xs = [v + 1 for v in sorted(self._roster)]
        b_shares = shamir.split(self._b, threshold=self.threshold, xs=xs)
        s_shares = shamir.split(_private_bytes(self._s_key), threshold=self.threshold, xs=xs)
        sealed: dict[str, str] = {}
        for v in sorted(self._roster):
            pair = (b_shares[v + 1], s_shares[v + 1])
            if v == self.client_id:
                self._held[v] = pair
                continue
            plain = json.dumps(
                {
                    "from": self.client_id,
                    "to": v,
                    "b": shamir.share_to_bytes(pair[0]).hex(),
                    "s": shamir.share_to_bytes(pair[1]).hex(),
                }
            ).encode()
            nonce = os.urandom(12)
            aead = AESGCM(self._channel_key(v))
            sealed[str(v)] = (
                nonce
                + aead.encrypt(nonce, plain, _aad(self.session, self.round, self.client_id, v))
            ).hex()
        return pack(self._mine("share_keys"), {"shares": sealed})

    def masked_input(self, relayed: bytes) -> bytes:
        """Stage 3: open the neighbours' shares; send the masked, fixed-point input."""
        expect = self._expect("masked_input")
        header, _ = unpack(relayed, expect)
        where = expect.where()
        shares = get_field(header, "shares", dict, where)
        for text_sender, sealed in shares.items():
            u = _int_key(text_sender, where)
            if u not in self._roster or u == self.client_id or u in self._held:
                raise ProtocolError(f"{where}: a share from client {u}, not a neighbour")
            self._held[u] = self._open_share(u, sealed, where)
        fixed = self.fixed
        assert fixed is not None and self._s_key is not None
        encoded, clipped = fixed.encode(self.values)
        stats = fixed.encode_counts(np.append(self.counts, clipped))
        vector = np.concatenate([encoded, stats])
        expander = MaskExpander(vector.size, fixed.dtype)
        expander.apply(vector, self._b, sign=+1)
        for v in sorted(self._held):
            if v == self.client_id:
                continue
            shared = self._s_key.exchange(X25519PublicKey.from_public_bytes(self._roster[v][1]))
            key = derive_key(
                shared, label="mask", session=self.session, parties=(self.client_id, v)
            )
            expander.apply(vector, key, sign=+1 if self.client_id < v else -1)
        body = vector.astype(vector.dtype.newbyteorder("<"), copy=False).tobytes()
        return pack(self._mine("masked_input"), {"entries": int(vector.size)}, body)

    def consistency(self, request: bytes) -> bytes:
        """Stage 4: sign the list of share-group members whose masked input the server says
        arrived (with the group, so neighbours can compare views where groups overlap)."""
        expect = self._expect("consistency")
        header, _ = unpack(request, expect)
        where = expect.where()
        survivors = _client_list(header, "survivors", where)
        if self.client_id not in survivors:
            raise ProtocolError(f"{where}: the survivors list omits this client")
        total = get_field(header, "total", int, where)
        if total < max(self.threshold, len(survivors)):
            raise ProtocolError(
                f"{where}: only {total} inputs would be summed; {self.threshold} are the least "
                "this client accepts"
            )
        if not set(survivors) <= set(self.group):
            raise ProtocolError(f"{where}: the survivors list names clients outside the group")
        self._signed = tuple(survivors)
        return pack(
            self._mine("consistency"),
            {"survivors": list(survivors), "group": list(self.group), "total": total},
            signer=self.identity,
        )

    def unmask(self, request: bytes) -> bytes:
        """Stage 5: check t signatures on the signed list; reveal one share per neighbour."""
        expect = self._expect("unmasking")
        header, body = unpack(request, expect)
        where = expect.where()
        survivors = tuple(_client_list(header, "survivors", where))
        dropped = set(_client_list(header, "dropped", where))
        if self._signed is None or survivors != self._signed:
            raise ProtocolError(
                f"{where}: refused: the survivors differ from the list this client signed"
            )
        if dropped & set(survivors):
            both = sorted(dropped & set(survivors))
            raise ProtocolError(
                f"{where}: refused: the server asks for both the self-mask and the mask-key "
                f"shares of client(s) {both}"
            )
        signers: set[int] = set()
        group = set(self.group)
        for signed in unpack_list(body, where):
            sender = peek_sender(signed, where)
            key = self.directory.get(sender)
            if sender not in survivors or sender in signers or key is None:
                continue
            inner = Expect(self.session, self.round, "consistency", sender)
            inner_header, _ = unpack(signed, inner, verify=key)
            theirs = set(_client_list(inner_header, "survivors", inner.where()))
            overlap = group & set(_client_list(inner_header, "group", inner.where()))
            # the signer's view of who survived must agree with ours wherever we both look
            if sender in group and theirs & overlap == set(survivors) & overlap:
                signers.add(sender)
            if len(signers) >= self.threshold:
                break
        if len(signers) < self.threshold:
            raise ProtocolError(
                f"{where}: refused: {len(signers)} neighbours signed a survivors list that "
                f"agrees with this one; {self.threshold} are needed"
            )
        reveal: dict[str, dict[str, str]] = {"b": {}, "s": {}}
        for u, (b_share, s_share) in sorted(self._held.items()):
            kind = "b" if u in survivors else "s" if u in dropped else None
            if kind is None:
                continue
            if self._revealed.get(u, kind) != kind:
                raise ProtocolError(
                    f"{where}: refused: client {u}'s {self._revealed[u]!r} share was already "
                    f"revealed; revealing its {kind!r} share too would unmask its input"
                )
            self._revealed[u] = kind
            share = b_share if kind == "b" else s_share
            reveal[kind][str(u)] = shamir.share_to_bytes(share).hex()
        return pack(self._mine("unmasking"), reveal)

    def _channel_key(self, v: int) -> bytes:
        assert self._c_key is not None
        shared = self._c_key.exchange(X25519PublicKey.from_public_bytes(self._roster[v][0]))
        return derive_key(shared, label="share", session=self.session, parties=(self.client_id, v))

    def _open_share(self, u: int, sealed: object, where: str) -> tuple[int, int]:
        if not isinstance(sealed, str):
            raise ProtocolError(f"{where}: client {u}'s share is not hex")
        try:
            blob = bytes.fromhex(sealed)
            plain = AESGCM(self._channel_key(u)).decrypt(
                blob[:12], blob[12:], _aad(self.session, self.round, u, self.client_id)
            )
        except (ValueError, InvalidTag):
            raise ProtocolError(
                f"{where}: client {u}'s share does not decrypt (tampered, or not for this "
                "client and round)"
            ) from None
        content = json.loads(plain)
        if content.get("from") != u or content.get("to") != self.client_id:
            raise ProtocolError(f"{where}: client {u}'s share names other parties")
        try:
            return (
                shamir.share_from_bytes(bytes.fromhex(content["b"])),
                shamir.share_from_bytes(bytes.fromhex(content["s"])),
            )
        except (KeyError, ValueError) as exc:
            raise ProtocolError(f"{where}: client {u}'s share is malformed ({exc})") from None


def _int_key(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ProtocolError(f"{where}: {text!r} is not a client id") from None


def _client_list(header: Mapping[str, Any], name: str, where: str) -> list[int]:
    items = get_field(header, name, list, where)
    if any(not isinstance(i, int) or isinstance(i, bool) for i in items):
        raise ProtocolError(f"{where}: {name!r} must list client ids")
    if len(set(items)) != len(items):
        raise ProtocolError(f"{where}: {name!r} repeats a client")
    return sorted(items)


@dataclass
class SecAggServer:
    """The server's side of a round: relays, checks and finally unmasks the sum.

    Args:
        groups: each client's share group.
        threshold: shares needed per secret.
        fixed: the round's fixed-point encoding.
        entries: ring entries per masked vector (values, counts and the clipped count).
        directory: every client's Ed25519 public key.
        session: the round's random session id.
        round: the round.
    """

    groups: Mapping[int, tuple[int, ...]]
    threshold: int
    fixed: FixedPoint
    entries: int
    directory: Mapping[int, Ed25519PublicKey]
    session: bytes
    round: int
    adverts: dict[int, bytes] = field(default_factory=dict)
    s_public: dict[int, bytes] = field(default_factory=dict)
    sealed: dict[int, dict[int, str]] = field(default_factory=dict)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    signatures: dict[int, bytes] = field(default_factory=dict)
    survivors: tuple[int, ...] = ()
    relayed_to: dict[int, set[int]] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)

    def _expect(self, stage: str, sender: int) -> Expect:
        return Expect(self.session, self.round, stage, sender)

    def _down(self, stage: str, fields: dict[str, Any], body: bytes = b"") -> bytes:
        return pack(self._expect(stage, SERVER), fields, body)

    def setup(self) -> dict[int, bytes]:
        """Stage 1's messages: each client's share group and the round's encoding."""
        return {
            c: self._down(
                "advertise_keys",
                {
                    "group": list(group),
                    "threshold": self.threshold,
                    "clipping_range": float(self.fixed.clipping_range),
                    "cohort": self.fixed.cohort,
                    "bits": self.fixed.bits,
                },
            )
            for c, group in self.groups.items()
        }

    def _accept(self, stage: str, arrived: Mapping[int, bytes], read: Any) -> list[int]:
        ok = []
        for client, message in sorted(arrived.items()):
            try:
                read(client, message)
                ok.append(client)
            except ProtocolError as exc:
                self.rejected[client] = str(exc)
                logger.warning("round %d: %s; the client is treated as dropped", self.round, exc)
        return ok

    def collect_keys(self, arrived: Mapping[int, bytes]) -> list[int]:
        """U1: the clients whose signed keys verify."""

        def read(client: int, message: bytes) -> None:
            expect = self._expect("advertise_keys", client)
            header, _ = unpack(message, expect, verify=self.directory[client])
            self.s_public[client] = hex_field(header, "s_pk", _KEY, expect.where())
            hex_field(header, "c_pk", _KEY, expect.where())
            self.adverts[client] = message

        return self._require(self._accept("advertise_keys", arrived, read), "advertise_keys")

    def rosters(self, alive: Sequence[int]) -> dict[int, bytes]:
        """Stage 2's messages: each client's neighbours' signed keys, verbatim."""
        return {
            c: self._down(
                "share_keys",
                {},
                pack_list([self.adverts[v] for v in self.groups[c] if v in self.adverts]),
            )
            for c in alive
        }

    def collect_shares(self, arrived: Mapping[int, bytes]) -> list[int]:
        """U2: the clients that sent their neighbours encrypted shares."""

        def read(client: int, message: bytes) -> None:
            expect = self._expect("share_keys", client)
            header, _ = unpack(message, expect)
            sealed = get_field(header, "shares", dict, expect.where())
            recipients = {_int_key(k, expect.where()) for k in sealed}
            if not recipients <= set(self.groups[client]) or not all(
                isinstance(v, str) for v in sealed.values()
            ):
                raise ProtocolError(f"{expect.where()}: shares for clients outside its group")
            self.sealed[client] = {int(k): v for k, v in sealed.items()}

        return self._require(self._accept("share_keys", arrived, read), "share_keys")

    def relay(self, alive: Sequence[int]) -> dict[int, bytes]:
        """Stage 3's messages: to each client, the shares its neighbours sealed for it."""
        out = {}
        for v in alive:
            shares = {str(u): s[v] for u, s in self.sealed.items() if v in s and u != v}
            self.relayed_to[v] = {int(u) for u in shares}
            out[v] = self._down("masked_input", {"shares": shares})
        return out

    def collect_inputs(self, arrived: Mapping[int, bytes]) -> list[int]:
        """U3: the clients whose masked input arrived (well formed)."""
        dtype = np.dtype(self.fixed.dtype).newbyteorder("<")

        def read(client: int, message: bytes) -> None:
            expect = self._expect("masked_input", client)
            header, body = unpack(message, expect)
            if client not in self.sealed:
                raise ProtocolError(f"{expect.where()}: the client shared no keys")
            entries = get_field(header, "entries", int, expect.where())
            if entries != self.entries or len(body) != entries * dtype.itemsize:
                raise ProtocolError(
                    f"{expect.where()}: {len(body)} bytes; {self.entries} entries of "
                    f"{dtype.itemsize} bytes were expected"
                )
            self.inputs[client] = np.frombuffer(body, dtype=dtype)

        return self._require(self._accept("masked_input", arrived, read), "masked_input")

    def _in_group(self, client: int, clients: Sequence[int]) -> list[int]:
        group = set(self.groups[client])
        return sorted(c for c in clients if c in group)

    def consistency_request(self, survivors: Sequence[int]) -> dict[int, bytes]:
        """Stage 4's messages: to each survivor, the members of its group whose input arrived."""
        self.survivors = tuple(sorted(survivors))
        return {
            c: self._down(
                "consistency",
                {"survivors": self._in_group(c, self.survivors), "total": len(self.survivors)},
            )
            for c in self.survivors
        }

    def collect_signatures(self, arrived: Mapping[int, bytes]) -> list[int]:
        """U4: the clients that signed the survivors list."""

        def read(client: int, message: bytes) -> None:
            expect = self._expect("consistency", client)
            header, _ = unpack(message, expect, verify=self.directory[client])
            signed = _client_list(header, "survivors", expect.where())
            if signed != self._in_group(client, self.survivors):
                raise ProtocolError(f"{expect.where()}: signed another survivors list")
            self.signatures[client] = message

        return self._require(self._accept("consistency", arrived, read), "consistency")

    def unmask_request(self, alive: Sequence[int]) -> dict[int, bytes]:
        """Stage 5's messages: per client, which group members survived or dropped, and the
        group's signatures."""
        dropped = sorted(set(self.sealed) - set(self.survivors))
        out = {}
        for c in alive:
            fields = {
                "survivors": self._in_group(c, self.survivors),
                "dropped": self._in_group(c, dropped),
            }
            signers = self._in_group(c, sorted(self.signatures))
            body = pack_list([self.signatures[w] for w in signers])
            out[c] = self._down("unmasking", fields, body)
        return out

    def unmask(self, arrived: Mapping[int, bytes]) -> tuple[np.ndarray, tuple[int, ...]]:
        """The ring sum of the survivors' inputs and who dropped after sending theirs.

        Raises:
            AggregationAbortedError: some secret has fewer than `threshold` shares; nothing is
                rebuilt.
        """
        b_shares: dict[int, dict[int, int]] = {}
        s_shares: dict[int, dict[int, int]] = {}

        def read(client: int, message: bytes) -> None:
            expect = self._expect("unmasking", client)
            header, _ = unpack(message, expect)
            for kind, store in (("b", b_shares), ("s", s_shares)):
                for text, share in get_field(header, kind, dict, expect.where()).items():
                    u = _int_key(text, expect.where())
                    if client not in self.groups.get(u, ()) or not isinstance(share, str):
                        raise ProtocolError(f"{expect.where()}: a share it cannot hold")
                    try:
                        value = shamir.share_from_bytes(bytes.fromhex(share))
                    except ValueError as exc:
                        raise ProtocolError(f"{expect.where()}: {exc}") from None
                    store.setdefault(u, {})[client + 1] = value

        responders = self._accept("unmasking", arrived, read)
        dropped = sorted(set(self.sealed) - set(self.survivors))
        needs = [(u, "self-mask seed", b_shares) for u in self.survivors] + [
            (u, "mask key", s_shares) for u in dropped
        ]
        for u, what, store in needs:
            have = len(store.get(u, {}))
            if have < self.threshold:
                raise AggregationAbortedError(
                    f"round {self.round}: secure aggregation aborted: {have} of client {u}'s "
                    f"share holders revealed its {what}; {self.threshold} are needed. The "
                    "server rebuilt no secret and learnt no sum."
                )
        total = np.zeros(self.entries, dtype=self.fixed.dtype)
        for u in self.survivors:
            np.add(total, self.inputs[u], out=total)
        expander = MaskExpander(self.entries, self.fixed.dtype)
        for u in self.survivors:
            seed = shamir.combine(b_shares[u], threshold=self.threshold)
            expander.apply(total, seed, sign=-1)
        for u in dropped:
            secret = shamir.combine(s_shares[u], threshold=self.threshold)
            key = X25519PrivateKey.from_private_bytes(secret)
            if _public_bytes(key.public_key()) != self.s_public[u]:
                raise AggregationAbortedError(
                    f"round {self.round}: secure aggregation aborted: the shares of client "
                    f"{u}'s mask key do not match its advertised key (a client sent bad shares)"
                )
            for v in self.survivors:
                if u in self.relayed_to.get(v, ()):
                    shared = key.exchange(X25519PublicKey.from_public_bytes(self.s_public[v]))
                    pair = derive_key(shared, label="mask", session=self.session, parties=(u, v))
                    expander.apply(total, pair, sign=-1 if v < u else +1)
        recovered = tuple(sorted(set(self.survivors) - set(responders)))
        return total, recovered

    def _require(self, clients: list[int], stage: str) -> list[int]:
        if len(clients) < self.threshold:
            raise AggregationAbortedError(
                f"round {self.round}: secure aggregation aborted at stage {stage}: "
                f"{len(clients)} clients remain; at least {self.threshold} are needed. The "
                "server holds only masked vectors and learnt nothing."
            )
        return clients


class _Timer:
    """Accumulates the compute time of one side."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started


class SecAgg(AggregationProtocol):
    """The `secagg` server defense: runs one protocol round per training round.

    Args:
        params: validated :class:`SecAggParams`.
        context: the run's :class:`~gradaudit.defenses.base.DefenseContext` (unused beyond
            its size; kept for the factory signature).
    """

    name = "secagg"
    visibility = Visibility.AGGREGATE_ONLY
    stages = STAGES
    guarantee = (
        "secure aggregation (Bonawitz et al. 2017): against an honest-but-curious or malicious "
        "server colluding with fewer than t clients of any share group, the server learns only "
        "the sum of at least t inputs; not differential privacy: the sum itself is released"
    )

    def __init__(self, params: SecAggParams, context: Any = None) -> None:
        self.params = params
        self._identities: dict[int, Ed25519PrivateKey] = {}
        self.rounds_run = 0
        self.aborted = 0

    def identity(self, client: int) -> Ed25519PrivateKey:
        """`client`'s long-term signing key (made once: the PKI's enrolment)."""
        if client not in self._identities:
            self._identities[client] = Ed25519PrivateKey.generate()
        return self._identities[client]

    def notes(self) -> list[str]:
        p = self.params
        graph = (
            "every client shares with every other (complete graph)"
            if p.neighbours is None
            else f"each client shares with {p.neighbours - 1} neighbours on a random ring "
            "(SecAgg+): its cost does not grow with the cohort, and the threshold applies "
            "per share group"
        )
        return [
            f"{graph}; a share group needs a fraction {p.threshold} of its members (at least 2) "
            "to recover a client's secrets",
            f"values are encoded in a {p.bits}-bit ring, clipped to ±{p.clipping_range}; "
            "clipped entries are counted in the report (summed securely, never per client)",
            "the server chooses the share graph: a malicious server could isolate a client "
            "with a graph of its choosing (Bell et al. let clients derive it from public "
            "randomness instead)",
            "the sum of the survivors' updates is revealed exactly; attacks on the aggregate "
            "still apply, and only DP noise bounds what the sum says about one client",
        ]

    def secure_sum(
        self,
        contributions: Sequence[Contribution],
        *,
        round: int,
        cohort: int,
        network: Any,
    ) -> SecureSum:
        """One protocol round over `contributions` through `network` (see the module doc)."""
        n, n_counts = check_contributions(contributions, round=round, cohort=cohort, name="secagg")
        by_client = {c.client_id: c for c in contributions}
        fixed = FixedPoint(
            self.params.clipping_range, max(cohort, len(by_client)), self.params.bits
        )
        groups = share_groups(sorted(by_client), self.params.neighbours)
        group_size = min(len(g) for g in groups.values())
        threshold = threshold_count(self.params.threshold, group_size)
        if len(by_client) < 2:
            raise AggregationAbortedError(
                f"round {round}: secure aggregation needs at least 2 clients; "
                f"{len(by_client)} finished training"
            )
        session = os.urandom(16)
        directory = {c: self.identity(c).public_key() for c in by_client}
        entries = n + n_counts + 1  # values, counts and the clipped count
        server = SecAggServer(groups, threshold, fixed, entries, directory, session, round)
        clients = {
            c: SecAggClient(c, self.identity(c), directory, k.values, k.counts)
            for c, k in by_client.items()
        }
        client_time, server_time = _Timer(), _Timer()

        def stage(name: str, down: dict[int, bytes], act: Any) -> dict[int, bytes]:
            reached = network.send_down(name, down)
            sent = {}
            for c, message in reached.items():
                try:
                    sent[c] = client_time.run(act, clients[c], message)
                except ProtocolError as exc:
                    logger.warning("round %d: client %d stops: %s", round, c, exc)
            return network.deliver(name, sent)

        try:
            setup = server_time.run(server.setup)
            u1 = server_time.run(
                server.collect_keys,
                stage(
                    "advertise_keys",
                    setup,
                    lambda cl, m: cl.advertise(m, session=session, rnd=round),
                ),
            )
            u2 = server_time.run(
                server.collect_shares,
                stage("share_keys", server_time.run(server.rosters, u1), SecAggClient.share_keys),
            )
            u3 = server_time.run(
                server.collect_inputs,
                stage("masked_input", server_time.run(server.relay, u2), SecAggClient.masked_input),
            )
            u4 = server_time.run(
                server.collect_signatures,
                stage(
                    "consistency",
                    server_time.run(server.consistency_request, u3),
                    SecAggClient.consistency,
                ),
            )
            answers = stage(
                "unmasking", server_time.run(server.unmask_request, u4), SecAggClient.unmask
            )
            total, recovered = server_time.run(server.unmask, answers)
        except AggregationAbortedError:
            self.aborted += 1
            raise
        finally:
            self.rounds_run += 1
        signed = fixed.signed(total[n:])
        values = server_time.run(fixed.decode, total[:n])
        survivors = server.survivors
        return SecureSum(
            values=values,
            counts=signed[:-1],
            included=survivors,
            dropped=tuple(sorted(set(by_client) - set(survivors))),
            recovered=recovered,
            clipped=int(signed[-1]),
            stages=network.costs(),
            client_seconds=client_time.seconds,
            server_seconds=server_time.seconds,
        )


@SERVER_DEFENSES.register(
    "secagg",
    summary="secure aggregation (Bonawitz et al. 2017; SecAgg+ share groups, Bell et al. 2020): "
    "the server sees only the sum; X25519, Shamir, AES-GCM, AES-CTR masks, 4 bytes per entry",
    params=SecAggParams,
)
def _secagg(params: SecAggParams, context: Any) -> SecAgg:
    return SecAgg(params, context)
