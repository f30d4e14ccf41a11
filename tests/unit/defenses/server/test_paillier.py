"""``paillier``: textbook oracles, the homomorphism, exact sums of counts, malformed messages."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from phe import paillier
from pydantic import ValidationError
from torch import nn
from upload_doubles import Tamper, upload_network

from gradaudit.config import FederationSpec
from gradaudit.defenses import SERVER_DEFENSES
from gradaudit.defenses.base import DefenseContext
from gradaudit.defenses.server.base import AggregationAbortedError, Contribution, ProtocolError
from gradaudit.defenses.server.paillier import (
    Paillier,
    PaillierParams,
    ciphertext_width,
    decode_signed,
    encode_signed,
    paillier_sum,
)
from gradaudit.types import TaskInfo, Visibility

TASK = TaskInfo("toy", "tabular", (2,), 2, None, ("a", "b"))


def _contributions(clients: int, size: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        Contribution(
            c,
            rng.normal(0, 1, size).astype(np.float32).astype(np.float64),
            np.array([rng.integers(1, 10_000), c % 2, -7 * c]),
        )
        for c in range(clients)
    ]


def _textbook_decrypt(p: int, q: int, c: int) -> int:
    """Paillier's decryption from its definition (g = n + 1): L(c^lambda mod n^2) mu mod n."""
    n = p * q
    lam = math.lcm(p - 1, q - 1)
    mu = pow((pow(n + 1, lam, n * n) - 1) // n, -1, n)
    return (pow(c, lam, n * n) - 1) // n * mu % n


@pytest.fixture(scope="module")
def protocol() -> Paillier:
    return Paillier(PaillierParams(key_length=1024), max_cohort=30)


def test_textbook_example_encrypts_and_decrypts() -> None:
    # p = 3, q = 5: n = 15, g = 16, n^2 = 225; m = 12 with r = 7 gives
    # 16^12 * 7^15 mod 225 = 208 (the worked example of Apache Pirk's Paillier discussion)
    assert pow(16, 12, 225) * pow(7, 15, 225) % 225 == 208
    assert _textbook_decrypt(3, 5, 208) == 12
    pub = paillier.PaillierPublicKey(15)
    assert pub.raw_encrypt(12, r_value=7) == 208
    assert paillier.PaillierPrivateKey(pub, 3, 5).raw_decrypt(208) == 12


def test_the_product_of_ciphertexts_decrypts_to_the_sum_by_the_definition() -> None:
    # Prepare: p = 7, q = 11 (n = 77), fixed obfuscators; ciphertexts from the definition
    p, q = 7, 11
    n = p * q
    pub = paillier.PaillierPublicKey(n)

    def textbook_encrypt(m: int, r: int) -> int:
        return pow(n + 1, m, n * n) * pow(r, n, n * n) % (n * n)

    # Act
    c = paillier_sum(pub, [textbook_encrypt(30, 13), textbook_encrypt(40, 29)])

    # Assert: both the definition and phe agree on E(30) E(40) = E(70)
    assert textbook_encrypt(30, 13) == pub.raw_encrypt(30, r_value=13)
    assert _textbook_decrypt(p, q, c) == 70
    assert paillier.PaillierPrivateKey(pub, p, q).raw_decrypt(c) == 70
    assert paillier_sum(pub, []) == 1 and _textbook_decrypt(p, q, 1) == 0


def test_paillier_sum_adds_signed_integers(protocol: Paillier) -> None:
    # Prepare
    protocol.secure_sum(_contributions(1), round=99, cohort=1, network=upload_network())
    pub = protocol.public_key
    numbers = [123_456_789, -42, 0, 2**62, -(2**40)]

    # Act
    c = paillier_sum(pub, [pub.raw_encrypt(encode_signed(pub, m)) for m in numbers])

    # Assert
    assert decode_signed(pub, protocol._authority._private_key.raw_decrypt(c)) == sum(numbers)


def test_sum_of_counts_is_exact_and_values_are_summed_in_the_clear(protocol: Paillier) -> None:
    # Prepare
    contributions = _contributions(6, size=200)

    # Act
    result = protocol.secure_sum(contributions, round=1, cohort=6, network=upload_network())

    # Assert
    assert result.included == tuple(range(6))
    assert result.counts.tolist() == sum(c.counts for c in contributions).tolist()
    np.testing.assert_allclose(result.values, sum(c.values for c in contributions), atol=1e-12)
    (stage,) = result.stages
    width = ciphertext_width(protocol.public_key)
    assert stage.bytes_up == 6 * (21 + 4 * 200 + 3 * width)
    assert result.clipped == 0


def test_dropouts_leave_only_the_included_clients_in_the_sum(protocol: Paillier) -> None:
    contributions = _contributions(12, seed=5)
    result = protocol.secure_sum(contributions, round=2, cohort=12, network=upload_network(0.3))
    assert result.dropped and sorted(result.included + result.dropped) == list(range(12))
    kept = [c for c in contributions if c.client_id in result.included]
    assert result.counts.tolist() == sum(c.counts for c in kept).tolist()


def test_a_wrong_key_does_not_decrypt_the_sum(protocol: Paillier) -> None:
    # Prepare: the server's product of two clients' encrypted counts, and another key pair
    protocol.secure_sum(_contributions(1), round=98, cohort=1, network=upload_network())
    pub = protocol.public_key
    c = paillier_sum(pub, [pub.raw_encrypt(1000), pub.raw_encrypt(234)])
    other_pub, other_priv = paillier.generate_paillier_keypair(n_length=1024)

    # Act
    guess = other_priv.raw_decrypt(c % other_pub.nsquare)

    # Assert
    assert guess != 1234
    assert protocol._authority._private_key.raw_decrypt(c) == 1234


def _ciphertext_at(message: bytes, n_values: int, index: int, width: int) -> slice:
    start = 21 + 4 * n_values + index * width
    return slice(start, start + width)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("truncate", "bytes, not"),
        ("extend", "bytes, not"),
        ("round", "round 7"),
        ("zero", r"outside \(0, n\^2\)"),
        ("huge", r"outside \(0, n\^2\)"),
        ("factor", "shares a factor with n"),
    ],
)
def test_a_malformed_upload_is_a_protocol_error_naming_the_client(
    protocol: Paillier, change: str, reason: str
) -> None:
    # Prepare: client 2's upload (50 values, 3 ciphertexts) is rewritten on its way
    protocol.secure_sum(_contributions(1), round=97, cohort=1, network=upload_network())
    pub = protocol.public_key
    width = ciphertext_width(pub)

    def rewrite(message: bytes) -> bytes:
        data = bytearray(message)
        where = _ciphertext_at(message, 50, 1, width)
        if change == "truncate":
            return message[:-1]
        if change == "extend":
            return message + b"\x00"
        if change == "round":
            data[5:9] = struct.pack("<I", 7)
        elif change == "zero":
            data[where] = bytes(width)
        elif change == "huge":
            data[where] = b"\xff" * width
        else:
            data[where] = pub.n.to_bytes(width, "big")
        return bytes(data)

    # Act / Assert
    with pytest.raises(ProtocolError, match=rf"client 2, stage 'upload': .*{reason}"):
        protocol.secure_sum(_contributions(4), round=3, cohort=4, network=Tamper(2, rewrite))


def test_no_upload_arriving_aborts_the_round(protocol: Paillier) -> None:
    class Lossy(Tamper):
        def deliver(self, stage, messages):
            return {}

    with pytest.raises(AggregationAbortedError, match="no client's paillier upload reached"):
        protocol.secure_sum(_contributions(2), round=4, cohort=2, network=Lossy(0, None))


def test_the_report_says_the_updates_stay_visible(protocol: Paillier) -> None:
    entry = protocol.describe()
    assert protocol.visibility is Visibility.INDIVIDUAL
    assert entry["visibility"] == "individual"
    assert "the server still sees each update" in entry["guarantee"]
    assert any("protects only the integer statistics" in w for w in entry["warnings"])
    assert any(
        n.startswith("Paillier protects only the integer statistics") for n in entry["notes"]
    )


def test_registered_factory_and_parameters() -> None:
    context = DefenseContext(nn.Linear(2, 2), FederationSpec(), (5,) * 7, TASK)
    params = SERVER_DEFENSES.parse_params("paillier", {"key_length": 1024})
    built = SERVER_DEFENSES.get("paillier")(params, context)
    assert isinstance(built, Paillier) and built.max_cohort == 7
    assert PaillierParams().key_length == 2048
    with pytest.raises(ValidationError):
        PaillierParams(key_length=512)
