"""``ckks``: the decrypted sum's error, clipping, dropouts, key models, malformed messages."""

from __future__ import annotations

import random

import numpy as np
import pytest
import tenseal as ts
from pydantic import ValidationError
from torch import nn
from upload_doubles import Tamper, upload_network

from gradaudit.config import FederationSpec
from gradaudit.defenses import SERVER_DEFENSES
from gradaudit.defenses.base import DefenseContext
from gradaudit.defenses.server.base import AggregationAbortedError, Contribution, ProtocolError
from gradaudit.defenses.server.ckks import (
    Ckks,
    CkksEncoding,
    CkksParams,
    build_ckks,
    check_tensor_bytes,
    unframe,
)
from gradaudit.types import TaskInfo, Visibility

TASK = TaskInfo("toy", "tabular", (2,), 2, None, ("a", "b"))


def _contributions(clients: int, size: int, seed: int = 0, std: float = 0.05):
    rng = np.random.default_rng(seed)
    return [
        Contribution(c, rng.normal(0.0, std, size), np.array([rng.integers(0, 5000), c % 2, -3]))
        for c in range(clients)
    ]


def _sums(contributions, included):
    values = sum(c.values for c in contributions if c.client_id in included)
    counts = sum(c.counts for c in contributions if c.client_id in included)
    return values, counts


@pytest.fixture(scope="module")
def authority() -> Ckks:
    return Ckks(CkksParams(), max_cohort=50)


def test_sum_of_50_clients_is_within_1e6_and_counts_are_exact(authority: Ckks) -> None:
    # Prepare: 50 clients of 20k values ~ N(0, 0.05) and three integer statistics
    contributions = _contributions(50, 20_000)

    # Act
    result = authority.secure_sum(contributions, round=1, cohort=50, network=upload_network())

    # Assert: the CKKS noise stays below the bound; the counts are exact
    values, counts = _sums(contributions, result.included)
    assert result.included == tuple(range(50)) and result.dropped == ()
    assert np.abs(result.values - values).max() <= 1e-6
    assert result.counts.tolist() == counts.tolist()
    assert result.clipped == 0
    assert result.client_seconds > 0 and result.server_seconds > 0
    (stage,) = result.stages
    assert stage.stage == "upload" and stage.clients == 50
    assert stage.bytes_up > 50 * 4 * 20_000


def test_values_beyond_the_range_are_clipped_and_counted() -> None:
    # Prepare: a range of 1.0; client 0 sends 3 values outside it (one infinite)
    protocol = Ckks(CkksParams(clipping_range=1.0), max_cohort=3)
    rng = np.random.default_rng(1)
    contributions = [Contribution(c, rng.uniform(-1, 1, 5000), np.array([7])) for c in range(3)]
    wild = contributions[0].values.copy()
    wild[[10, 20, 30]] = [5.0, -2.5, np.inf]
    contributions[0] = Contribution(0, wild, np.array([7]))

    # Act
    result = protocol.secure_sum(contributions, round=1, cohort=3, network=upload_network())

    # Assert: the sum is that of the clipped inputs, and the clipped entries are counted
    clipped = sum(np.clip(c.values, -1.0, 1.0) for c in contributions)
    assert result.clipped == 3
    assert np.abs(result.values - clipped).max() <= 1e-6
    assert result.values[[10, 20, 30]] == pytest.approx(clipped[[10, 20, 30]], abs=1e-6)
    assert result.counts.tolist() == [21]


@pytest.mark.parametrize("key_model", ["authority", "shared"])
def test_the_sum_covers_exactly_the_included_clients_under_dropouts(key_model: str) -> None:
    # Prepare: 20 clients on a network that drops each with probability 0.3
    protocol = Ckks(CkksParams(key_model=key_model), max_cohort=20)
    contributions = _contributions(20, 3000, seed=2)

    # Act
    result = protocol.secure_sum(contributions, round=4, cohort=20, network=upload_network(0.3))

    # Assert: some dropped, and the sum is the included clients' only
    assert result.dropped and result.included
    assert sorted(result.included + result.dropped) == list(range(20))
    values, counts = _sums(contributions, result.included)
    assert np.abs(result.values - values).max() <= 1e-6
    assert result.counts.tolist() == counts.tolist()
    assert result.stages[0].clients == len(result.included)


def test_under_the_authority_model_neither_clients_nor_server_hold_the_secret_key(
    authority: Ckks,
) -> None:
    # Prepare: what a client receives, and one client's upload
    received = ts.context_from(authority.client_material)
    message, _ = authority.encrypt(_contributions(1, 100)[0], round=1)
    tensor = ts.ckks_tensor_from(authority.client_context, unframe(message, round=1, client=0))

    # Assert: public contexts only, and a client cannot decrypt a ciphertext
    assert not received.has_secret_key() and received.is_public()
    assert not authority.client_context.has_secret_key()
    assert not authority.server_context.has_secret_key()
    with pytest.raises(ValueError, match="secret"):
        tensor.decrypt()


def test_under_the_shared_model_every_client_holds_the_secret_key() -> None:
    # Prepare
    protocol = Ckks(CkksParams(key_model="shared"), max_cohort=4)
    contributions = _contributions(4, 1000, seed=3)

    # Act
    result = protocol.secure_sum(contributions, round=1, cohort=4, network=upload_network())
    message, _ = protocol.encrypt(contributions[1], round=1)
    stolen = ts.ckks_tensor_from(protocol.client_context, unframe(message, round=1, client=1))

    # Assert: the sum is right, the server holds no key, yet any client decrypts any upload
    values, _ = _sums(contributions, result.included)
    assert np.abs(result.values - values).max() <= 1e-6
    assert not protocol.server_context.has_secret_key()
    assert protocol.client_context.has_secret_key()
    decrypted = np.array(stolen.decrypt().raw)[:1000]
    assert np.abs(decrypted - contributions[1].values).max() <= 1e-6
    entry = protocol.describe()
    assert any("decrypts every individual update" in w for w in entry["warnings"])
    assert any(n.startswith("Key model shared") for n in entry["notes"])


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m[: len(m) // 2], "truncated"),
        (lambda m: m[:10], "fewer than its header"),
        (lambda m: m[:13], "holds 0 ciphertexts"),  # an empty tensor crashes TenSEAL
        (lambda m: m[:13] + b"\x08\x01", r"holds 0 ciphertexts of shape \[1\]"),
        (lambda m: m[:13] + b"x" * 200, "tensor"),
        (lambda m: b"GCKS\x01\x09\x00\x00\x00\x03\x00\x00\x00" + m[13:], "round 9"),
        (lambda m: m[:-1], "truncated"),
    ],
)
def test_a_malformed_upload_is_a_protocol_error_naming_the_client(change, reason: str) -> None:
    # Prepare: client 3's upload is rewritten on its way
    protocol = Ckks(CkksParams(), max_cohort=5)
    contributions = _contributions(5, 3000)

    # Act / Assert
    with pytest.raises(ProtocolError, match=rf"client 3, stage 'upload': .*{reason}"):
        protocol.secure_sum(contributions, round=1, cohort=5, network=Tamper(3, change))


def test_random_corruption_never_crashes_the_server() -> None:
    # Prepare: bit flips, cuts and zeroed runs in one client's ciphertexts (fixed seed)
    protocol = Ckks(CkksParams(), max_cohort=2)
    contributions = _contributions(2, 2000)
    rnd = random.Random(0)

    def corrupt(message: bytes) -> bytes:
        data = bytearray(message)
        pos = rnd.randrange(13, len(data))
        kind = rnd.randrange(3)
        if kind == 0:
            data[pos] ^= 1 << rnd.randrange(8)
        elif kind == 1:
            del data[pos:]
        else:
            data[pos : pos + 16] = bytes(16)
        return bytes(data)

    # Act / Assert: each round fails cleanly or yields a sum; the process survives
    outcomes = set()
    for round in range(1, 31):
        try:
            protocol.secure_sum(contributions, round=round, cohort=2, network=Tamper(1, corrupt))
            outcomes.add("undetected")
        except ProtocolError as exc:  # the client when its message is refused, else the sum
            assert "stage 'upload'" in str(exc)
            outcomes.add("refused")
    assert "refused" in outcomes


def test_no_upload_arriving_aborts_the_round() -> None:
    # Prepare: a network on which every upload is lost
    class Lossy(Tamper):
        def deliver(self, stage, messages):
            return {}

    protocol = Ckks(CkksParams(), max_cohort=3)

    # Act / Assert
    with pytest.raises(AggregationAbortedError, match="no client's ckks upload reached"):
        protocol.secure_sum(_contributions(3, 10), round=1, cohort=3, network=Lossy(0, lambda m: m))


def test_ciphertext_expansion_of_the_default_encoding_is_at_most_8x_float32(
    authority: Ckks,
) -> None:
    # Prepare: a 20k-value upload under the default parameters
    contribution = _contributions(1, 20_000)[0]

    # Act
    message, _ = authority.encrypt(contribution, round=1)

    # Assert: bytes on the wire per float32 byte
    assert len(message) / (4 * 20_000) <= 8.0


def test_expansion_and_encoding_are_reported(authority: Ckks) -> None:
    authority.secure_sum(_contributions(2, 20_000), round=2, cohort=2, network=upload_network())
    entry = authority.describe()
    assert entry["kind"] == "ckks" and entry["visibility"] == "aggregate_only"
    assert entry["encoding"]["coeff_mod_bit_sizes"] == [49, 49]
    assert 6.0 < entry["ciphertext_expansion"] <= 8.0
    assert entry["notes"][0].startswith("Key model authority")
    assert any("DP hybrid" in n for n in entry["notes"])
    assert any("not reproducible bit for bit" in n for n in entry["notes"])
    assert "key authority does not collude" in entry["guarantee"]
    assert authority.visibility is Visibility.AGGREGATE_ONLY


def test_encoding_is_derived_from_the_cohort_and_range() -> None:
    # A sum of K values within ±R at scale 2^s needs s + ceil(log2(K R)) + 2 bits
    enc = CkksEncoding.for_sum(cohort=1000, clipping_range=8.0, scale_bits=40, max_count=10)
    assert enc.coeff_mod_bit_sizes == (40 + 13 + 2,) * 2
    assert enc.poly_modulus_degree == 8192  # 110 bits exceed 4096's 109-bit bound
    assert enc.count_shift == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cohort": 10_000, "scale_bits": 48}, "at most 60 bits"),
        ({"cohort": 50, "scale_bits": 45, "poly_modulus_degree": 4096}, "128-bit security"),
        ({"cohort": 50, "scale_bits": 24, "max_count": 2**30}, "round a count wrongly"),
    ],
)
def test_insecure_or_lossy_encodings_are_refused(kwargs: dict, match: str) -> None:
    kwargs = {"clipping_range": 8.0, "max_count": 100, **kwargs}
    with pytest.raises(ValueError, match=match):
        CkksEncoding.for_sum(**kwargs)


def test_a_statistic_beyond_max_count_or_a_nan_is_refused() -> None:
    protocol = Ckks(CkksParams(max_count=100), max_cohort=2)
    with pytest.raises(ValueError, match=r"client 0's integer statistics \[101\] exceed max_count"):
        protocol.encrypt(Contribution(0, np.zeros(3), np.array([101])), round=1)
    with pytest.raises(ValueError, match="client 1: the values contain NaN"):
        protocol.encrypt(Contribution(1, np.array([np.nan]), np.array([1])), round=1)


def test_more_inputs_than_the_encoding_holds_are_refused() -> None:
    protocol = Ckks(CkksParams(), max_cohort=2)
    with pytest.raises(ValueError, match="sums at most 2 inputs"):
        protocol.secure_sum(_contributions(3, 10), round=1, cohort=3, network=upload_network())


def test_check_tensor_bytes_accepts_a_tensor_and_refuses_the_empty_message() -> None:
    enc = CkksEncoding.for_sum(cohort=2, clipping_range=1.0, scale_bits=30, max_count=1)
    ctx = enc.new_context(symmetric=True)
    matrix, _ = enc.pack(np.ones(3000), np.array([1]))
    data = ts.ckks_tensor(ctx, ts.plain_tensor(matrix), batch=True).serialize()
    check_tensor_bytes(data, enc, 2)
    for bad in (b"", b"\x08\x01", data[:-3]):
        with pytest.raises(ValueError):
            check_tensor_bytes(bad, enc, 2)
    with pytest.raises(ValueError, match="expected 3"):
        check_tensor_bytes(data, enc, 3)


def test_registered_factory_sizes_the_encoding_for_the_cohort() -> None:
    # Prepare
    context = DefenseContext(
        nn.Linear(2, 2), FederationSpec(clients_per_round=10), (5,) * 100, TASK
    )
    params = SERVER_DEFENSES.parse_params("ckks", {"key_model": "shared"})

    # Act
    protocol = SERVER_DEFENSES.get("ckks")(params, context)

    # Assert: ceil(log2(10 * 8)) + 2 = 9 bits above the scale
    assert SERVER_DEFENSES.get("ckks") is build_ckks
    assert protocol.max_cohort == 10
    assert protocol.encoding.coeff_mod_bit_sizes == (47, 47)
    with pytest.raises(ValidationError):
        CkksParams(key_model="everyone")
