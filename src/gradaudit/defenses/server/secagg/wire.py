"""The byte format of secure-aggregation messages, parsed strictly and never unpickled.

A message is ``MAGIC | version (1) | flags (1) | header length (4) | header | body length (8) |
body | [Ed25519 signature (64)]``. The header is a JSON object that always names the session (a
fresh random id per round), the round, the stage and the sender, so a message replayed from
another round, stage or sender is recognised and refused. The body carries bulk bytes (a masked
vector, a list of relayed messages). A signed message's signature covers everything before it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gradaudit.defenses.server.base import ProtocolError

MAGIC = b"GASA"
VERSION = 1
_SIGNED = 1
_PREFIX = struct.Struct(">4sBBI")
_BODY_LEN = struct.Struct(">Q")
SIGNATURE_BYTES = 64
MAX_HEADER = 1 << 24


@dataclass(frozen=True)
class Expect:
    """What the receiver expects of a message: its context, to refuse replays.

    Attributes:
        session: the round's session id.
        round: the round.
        stage: the protocol stage.
        sender: the party that must have sent it (-1: the server).
    """

    session: bytes
    round: int
    stage: str
    sender: int

    def where(self) -> str:
        """The message's origin, for error messages."""
        who = "the server" if self.sender < 0 else f"client {self.sender}"
        return f"message from {who} at stage {self.stage} of round {self.round}"


def pack(
    expect: Expect,
    fields: dict[str, Any],
    body: bytes | memoryview = b"",
    *,
    signer: Ed25519PrivateKey | None = None,
) -> bytes:
    """A message in `expect`'s context carrying JSON `fields` and the raw `body`."""
    header = {
        "session": expect.session.hex(),
        "round": expect.round,
        "stage": expect.stage,
        "sender": expect.sender,
        **fields,
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    flags = _SIGNED if signer is not None else 0
    data = b"".join(
        [_PREFIX.pack(MAGIC, VERSION, flags, len(head)), head, _BODY_LEN.pack(len(body)), body]
    )
    if signer is not None:
        data += signer.sign(data)
    return data


def unpack(
    data: bytes, expect: Expect, *, verify: Ed25519PublicKey | None = None
) -> tuple[dict[str, Any], memoryview]:
    """The header fields and the body of `data`, checked against `expect`.

    Args:
        data: the received bytes.
        expect: the context the message must belong to.
        verify: when given, the message must be signed by this key.

    Raises:
        ProtocolError: malformed, from another session/round/stage/sender (a replay), unsigned
            when a signature is required, or a signature that does not verify (forged or
            tampered). The message says which and where.
    """
    where = expect.where()
    view = memoryview(data)
    if len(view) < _PREFIX.size:
        raise ProtocolError(f"{where}: truncated ({len(view)} bytes)")
    magic, version, flags, head_len = _PREFIX.unpack_from(view)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"{where}: not a gradaudit secure-aggregation message (v{VERSION})")
    signed = bool(flags & _SIGNED)
    tail = SIGNATURE_BYTES if signed else 0
    start = _PREFIX.size
    if head_len > MAX_HEADER or start + head_len + _BODY_LEN.size + tail > len(view):
        raise ProtocolError(f"{where}: truncated header")
    (body_len,) = _BODY_LEN.unpack_from(view, start + head_len)
    body_start = start + head_len + _BODY_LEN.size
    if body_start + body_len + tail != len(view):
        raise ProtocolError(
            f"{where}: length mismatch ({len(view)} bytes, the header announces "
            f"{body_start + body_len + tail})"
        )
    if verify is not None:
        if not signed:
            raise ProtocolError(f"{where}: unsigned, but this stage requires a signature")
        try:
            verify.verify(bytes(view[-SIGNATURE_BYTES:]), bytes(view[:-SIGNATURE_BYTES]))
        except InvalidSignature:
            raise ProtocolError(
                f"{where}: the signature does not verify (forged or tampered)"
            ) from None
    try:
        header = json.loads(bytes(view[start : start + head_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{where}: the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{where}: the header is not an object")
    found = (header.get("session"), header.get("round"), header.get("stage"), header.get("sender"))
    wanted = (expect.session.hex(), expect.round, expect.stage, expect.sender)
    if found != wanted:
        raise ProtocolError(
            f"{where}: it belongs to session/round/stage/sender {found[1:]} of another context "
            f"than {wanted[1:]} (a replayed or misdirected message)"
        )
    return header, view[body_start : body_start + body_len]


def peek_sender(message: bytes, where: str) -> int:
    """The sender a relayed message claims, read without checks (to pick the key that
    :func:`unpack` then verifies it with).

    Raises:
        ProtocolError: the message is too malformed to name a sender.
    """
    try:
        _, _, _, head_len = _PREFIX.unpack_from(message)
        start = _PREFIX.size
        sender = json.loads(message[start : start + head_len]).get("sender")
    except (struct.error, ValueError, AttributeError, UnicodeDecodeError):
        raise ProtocolError(f"{where}: a relayed message is malformed") from None
    if not isinstance(sender, int) or isinstance(sender, bool):
        raise ProtocolError(f"{where}: a relayed message names no sender")
    return sender


def pack_list(items: list[bytes]) -> bytes:
    """Length-prefixed concatenation of `items` (relayed messages)."""
    return b"".join(struct.pack(">I", len(i)) + i for i in items)


def unpack_list(body: memoryview, where: str) -> list[bytes]:
    """The items of a :func:`pack_list` body.

    Raises:
        ProtocolError: the body is not a well-formed list.
    """
    items, pos = [], 0
    while pos < len(body):
        if pos + 4 > len(body):
            raise ProtocolError(f"{where}: truncated list")
        (n,) = struct.unpack_from(">I", body, pos)
        pos += 4
        if pos + n > len(body):
            raise ProtocolError(f"{where}: truncated list item")
        items.append(bytes(body[pos : pos + n]))
        pos += n
    return items


def get_field(header: dict[str, Any], name: str, kind: type, where: str) -> Any:
    """``header[name]``, which must be a `kind`.

    Raises:
        ProtocolError: missing or of another type.
    """
    value = header.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{where}: field {name!r} is missing or not a {kind.__name__}")
    return value


def hex_field(header: dict[str, Any], name: str, size: int, where: str) -> bytes:
    """``header[name]`` decoded from hex, which must be `size` bytes.

    Raises:
        ProtocolError: missing, not hex, or of another length.
    """
    text = get_field(header, name, str, where)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ProtocolError(f"{where}: field {name!r} is not hex") from None
    if len(value) != size:
        raise ProtocolError(f"{where}: field {name!r} is {len(value)} bytes, not {size}")
    return value
