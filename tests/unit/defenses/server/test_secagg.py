"""Secure aggregation: Shamir, fixed point, the protocol's exactness under dropouts, its abort,
and its refusals of forged, replayed, tampered and inconsistent messages."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy import stats

from gradaudit.config import NetworkSpec
from gradaudit.defenses.server.base import AggregationAbortedError, Contribution, ProtocolError
from gradaudit.defenses.server.fixedpoint import FixedPoint
from gradaudit.defenses.server.network import Network
from gradaudit.defenses.server.secagg import SecAgg, SecAggParams, shamir
from gradaudit.defenses.server.secagg.protocol import (
    STAGES,
    SecAggClient,
    SecAggServer,
    share_groups,
    threshold_count,
)
from gradaudit.defenses.server.secagg.wire import Expect, pack, pack_list, unpack
from gradaudit.errors import ConfigError

# ---------------------------------------------------------------- Shamir


def test_shamir_combine_matches_a_hand_made_polynomial() -> None:
    # f(x) = s + 3x + 5x^2 over GF(2^521 - 1): shares computed by hand, not by split()
    secret = int.from_bytes(b"\x42" * 32, "big")
    shares = {x: (secret + 3 * x + 5 * x * x) % shamir.PRIME for x in (2, 5, 9)}
    assert shamir.combine(shares, threshold=3) == b"\x42" * 32


def test_shamir_any_t_shares_recover_and_fewer_refuse() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    for subset in [(1, 2, 3), (2, 4, 5), (1, 3, 5)]:
        assert shamir.combine({x: shares[x] for x in subset}, threshold=3) == secret
    with pytest.raises(ValueError, match="cannot recover"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3)
    # a wrong share yields no valid 32-byte secret (or a different one), never the secret
    bad = {1: shares[1], 2: shares[2], 3: (shares[3] + 1) % shamir.PRIME}
    try:
        assert shamir.combine(bad, threshold=3) != secret
    except ValueError as exc:
        assert "inconsistent" in str(exc)


def test_shamir_share_wire_format_round_trips_and_rejects_junk() -> None:
    share = shamir.split(b"\x01" * 32, threshold=2, xs=[1, 2])[1]
    assert shamir.share_from_bytes(shamir.share_to_bytes(share)) == share
    with pytest.raises(ValueError):
        shamir.share_from_bytes(b"\xff" * shamir.SHARE_BYTES)  # >= PRIME
    with pytest.raises(ValueError):
        shamir.share_from_bytes(b"\x00" * 5)


# ---------------------------------------------------------------- fixed point


def test_fixed_point_sum_is_exact_and_never_wraps() -> None:
    fp = FixedPoint(clipping_range=2.0, cohort=7, bits=32)
    rng = np.random.default_rng(0)
    inputs = [rng.uniform(-3, 3, 1000) for _ in range(7)]
    encoded = [fp.encode(x) for x in inputs]
    total = encoded[0][0]
    for enc, _ in encoded[1:]:
        total = fp.add(total, enc)
    expected = sum(fp.signed(e) for e, _ in encoded)
    assert np.array_equal(fp.signed(total), expected)  # the exact fixed-point sum
    assert sum(c for _, c in encoded) == sum(int(np.sum(np.abs(x) > 2.0)) for x in inputs)
    # the extreme case: every client at +R or -R everywhere stays inside the signed range
    top = [fp.encode(np.full(3, 10.0))[0] for _ in range(7)]
    acc = top[0]
    for t in top[1:]:
        acc = fp.add(acc, t)
    assert np.allclose(fp.decode(acc), 14.0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot be summed"):
        fp.encode_counts(np.array([fp.max_count + 1]))


# ---------------------------------------------------------------- the protocol


def _contributions(n: int, size: int = 300, seed: int = 0) -> list[Contribution]:
    rng = np.random.default_rng(seed)
    return [Contribution(c, rng.normal(0, 0.5, size), np.array([c + 1, 1])) for c in range(n)]


def _fixed_sum(fp: FixedPoint, contributions: list[Contribution], ids) -> np.ndarray:
    return sum(fp.signed(fp.encode(c.values)[0]) for c in contributions if c.client_id in ids)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_aggregate_is_exact_with_dropouts_at_each_stage(stage: str, rate: float) -> None:
    contributions = _contributions(12)
    protocol = SecAgg(SecAggParams(threshold=0.3))
    network = Network(NetworkSpec(dropout={stage: rate}), STAGES, np.random.default_rng(3))
    result = protocol.secure_sum(contributions, round=1, cohort=12, network=network)
    fp = FixedPoint(8.0, 12)
    scaled = np.rint(result.values * fp.scale).astype(np.int64)
    assert np.array_equal(scaled, _fixed_sum(fp, contributions, result.included))
    assert result.counts.tolist() == [
        sum(c.client_id + 1 for c in contributions if c.client_id in result.included),
        len(result.included),
    ]
    assert set(result.included) | set(result.dropped) == set(range(12))
    if rate == 0.0:
        assert not network.gone
    if rate == 0.3:
        assert network.gone  # with this seed, someone drops at every stage
    if network.gone and stage in ("advertise_keys", "share_keys", "masked_input"):
        assert set(result.dropped) == network.gone and not result.recovered  # masks removed
    if network.gone and stage in ("consistency", "unmasking"):
        assert not result.dropped and set(result.recovered) == network.gone  # counted anyway


def test_sparse_share_groups_are_symmetric_and_sized() -> None:
    groups = share_groups(list(range(40)), 7)
    assert all(len(g) == 7 and c in g for c, g in groups.items())
    assert all(c in groups[v] for c, g in groups.items() for v in g)
    assert threshold_count(0.5, 7) == 4
    assert threshold_count(0.1, 7) == 2  # one answer never unmasks a client


def test_sparse_graph_aggregate_is_exact_with_dropouts() -> None:
    contributions = _contributions(30, size=200)
    protocol = SecAgg(SecAggParams(neighbours=9, threshold=0.4))
    network = Network(NetworkSpec(dropout=0.04), STAGES, np.random.default_rng(0))
    result = protocol.secure_sum(contributions, round=2, cohort=30, network=network)
    fp = FixedPoint(8.0, 30)
    scaled = np.rint(result.values * fp.scale).astype(np.int64)
    assert np.array_equal(scaled, _fixed_sum(fp, contributions, result.included))
    assert len(result.included) < 30  # some dropped, yet the sum is exact


def test_clipped_values_are_counted_in_the_sum_not_per_client() -> None:
    contributions = [Contribution(c, np.array([9.0, -20.0, 0.5]), np.array([1])) for c in range(3)]
    result = SecAgg(SecAggParams(clipping_range=8.0)).secure_sum(
        contributions, round=1, cohort=3, network=Network(None, STAGES, np.random.default_rng(0))
    )
    assert result.clipped == 6
    assert np.allclose(result.values, [24.0, -24.0, 1.5], atol=1e-6)


def test_below_threshold_the_round_aborts_before_any_secret_is_rebuilt(monkeypatch) -> None:
    rebuilt = []
    monkeypatch.setattr(shamir, "combine", lambda *a, **k: rebuilt.append(a) or b"")
    network = Network(NetworkSpec(dropout={"unmasking": 0.8}), STAGES, np.random.default_rng(1))
    with pytest.raises(AggregationAbortedError, match="learnt no sum"):
        SecAgg(SecAggParams(threshold=0.6)).secure_sum(
            _contributions(8), round=1, cohort=8, network=network
        )
    assert rebuilt == []


def test_too_few_clients_at_an_early_stage_abort_cleanly() -> None:
    network = Network(NetworkSpec(dropout={"share_keys": 0.9}), STAGES, np.random.default_rng(0))
    with pytest.raises(AggregationAbortedError, match="stage share_keys"):
        SecAgg(SecAggParams()).secure_sum(_contributions(6), round=1, cohort=6, network=network)


def test_masked_vectors_travel_at_ring_width() -> None:
    seen: dict[int, bytes] = {}

    class Recording(Network):
        def deliver(self, stage, messages):
            if stage == "masked_input":
                seen.update(messages)
            return super().deliver(stage, messages)

    contributions = _contributions(4, size=5000)
    SecAgg(SecAggParams()).secure_sum(
        contributions, round=1, cohort=4, network=Recording(None, STAGES, np.random.default_rng(0))
    )
    payload = 4 * (5000 + 2 + 1)  # values, counts, the clipped count: uint32 each
    assert all(payload < len(m) < payload + 300 for m in seen.values())


def test_masked_vectors_are_independent_of_the_inputs() -> None:
    captured: dict[str, np.ndarray] = {}

    def masked_of(values: np.ndarray) -> np.ndarray:
        class Recording(Network):
            def deliver(self, stage, messages):
                if stage == "masked_input":
                    captured["m"] = np.frombuffer(messages[0][-4 * (values.size + 3) :], "<u4")
                return super().deliver(stage, messages)

        others = _contributions(4, size=values.size)[1:]
        SecAgg(SecAggParams()).secure_sum(
            [Contribution(0, values, np.array([1, 1])), *others],
            round=1,
            cohort=4,
            network=Recording(None, STAGES, np.random.default_rng(0)),
        )
        return captured["m"][: values.size].astype(np.float64)

    n = 50_000
    rng = np.random.default_rng(5)
    structured = np.sin(np.arange(n) / 50.0) * 4  # far from uniform, strongly autocorrelated
    for values in (np.zeros(n), structured, rng.normal(0, 1, n)):
        masked = masked_of(values)
        # uniform over the ring: chi-square over 64 bins of the top bits
        counts = np.bincount((masked / 2**26).astype(int), minlength=64)
        assert stats.chisquare(counts).pvalue > 1e-4
        # no linear trace of the input, nor of its structure
        if values.std() > 0:
            assert abs(np.corrcoef(masked, values)[0, 1]) < 0.03
        assert abs(np.corrcoef(masked[:-1], masked[1:])[0, 1]) < 0.03
    # the masked vectors of two very different inputs have the same distribution
    assert stats.ks_2samp(masked_of(np.zeros(n)), masked_of(structured)).pvalue > 1e-4


def test_configured_dropout_must_name_real_stages() -> None:
    with pytest.raises(ConfigError, match="unknown stage"):
        Network(NetworkSpec(dropout={"upload": 0.1}), STAGES, np.random.default_rng(0))


def test_neighbours_must_be_odd() -> None:
    with pytest.raises(ValueError, match="odd"):
        SecAggParams(neighbours=12)


# ---------------------------------------------------------------- a server that misbehaves


class _Round:
    """A round driven by hand, stage by stage, so a test can tamper with any message."""

    def __init__(self, n: int = 5, threshold: int = 3) -> None:
        self.session, self.round = b"s" * 16, 7
        self.ids = list(range(n))
        self.keys = {c: Ed25519PrivateKey.generate() for c in self.ids}
        directory = {c: k.public_key() for c, k in self.keys.items()}
        groups = share_groups(self.ids, None)
        fp = FixedPoint(8.0, n)
        rng = np.random.default_rng(0)
        self.values = {c: rng.normal(0, 1, 50) for c in self.ids}
        self.clients = {
            c: SecAggClient(c, self.keys[c], directory, self.values[c], np.array([1]))
            for c in self.ids
        }
        self.server = SecAggServer(
            groups, threshold, fp, 50 + 2, directory, self.session, self.round
        )

    def advertise(self) -> dict[int, bytes]:
        setup = self.server.setup()
        return {
            c: self.clients[c].advertise(setup[c], session=self.session, rnd=self.round)
            for c in self.ids
        }

    def until_masked(self, ids=None) -> list[int]:
        ids = ids or self.ids
        u1 = self.server.collect_keys(self.advertise())
        rosters = self.server.rosters(u1)
        u2 = self.server.collect_shares({c: self.clients[c].share_keys(rosters[c]) for c in u1})
        relayed = self.server.relay(u2)
        return self.server.collect_inputs(
            {c: self.clients[c].masked_input(relayed[c]) for c in ids}
        )

    def until_unmask(self, ids=None) -> dict[int, bytes]:
        u3 = self.until_masked(ids)
        requests = self.server.consistency_request(u3)
        u4 = self.server.collect_signatures(
            {c: self.clients[c].consistency(requests[c]) for c in u3}
        )
        return self.server.unmask_request(u4)

    def request(self, survivors, dropped, signers) -> bytes:
        expect = Expect(self.session, self.round, "unmasking", -1)
        body = pack_list([self.server.signatures[c] for c in signers])
        return pack(expect, {"survivors": survivors, "dropped": dropped}, body)


def test_a_hand_driven_round_unmasks_the_exact_sum() -> None:
    rnd = _Round()
    requests = rnd.until_unmask()
    total, recovered = rnd.server.unmask({c: rnd.clients[c].unmask(requests[c]) for c in rnd.ids})
    fp = rnd.server.fixed
    expected = sum(fp.signed(fp.encode(v)[0]) for v in rnd.values.values())
    assert np.array_equal(fp.signed(total[:50]), expected)
    assert recovered == ()


def test_client_refuses_to_reveal_both_shares_of_one_client() -> None:
    rnd = _Round()
    rnd.until_unmask(ids=[0, 1, 2, 3])  # client 4 sends no masked input
    survivors = [0, 1, 2, 3]
    # one request that claims client 2 both survived and dropped
    both = rnd.request(survivors, [2, 4], survivors)
    with pytest.raises(ProtocolError, match="both the self-mask and the mask-key"):
        rnd.clients[0].unmask(both)
    # an honest request first (reveals client 2's self-mask share) ...
    rnd.clients[1].unmask(rnd.request(survivors, [4], survivors))
    # ... then a second one that calls client 2 dropped, to get its mask key too
    again = rnd.request(survivors, [2, 4], survivors)
    with pytest.raises(ProtocolError, match="refused"):
        rnd.clients[1].unmask(again)


def test_client_refuses_a_survivor_list_other_than_the_one_it_signed() -> None:
    rnd = _Round()
    rnd.until_unmask()
    liar = rnd.request([0, 1, 2, 3], [4], [0, 1, 2, 3])  # everyone signed [0..4]
    with pytest.raises(ProtocolError, match="differ from the list this client signed"):
        rnd.clients[0].unmask(liar)


def test_client_refuses_to_unmask_without_enough_signatures() -> None:
    rnd = _Round()
    rnd.until_unmask()
    thin = rnd.request(rnd.ids, [], [0, 1])  # threshold is 3
    with pytest.raises(ProtocolError, match="signed a survivors list"):
        rnd.clients[2].unmask(thin)


def test_forged_key_advertisement_is_rejected_by_server_and_clients(caplog) -> None:
    rnd = _Round()
    adverts = rnd.advertise()
    forger = Ed25519PrivateKey.generate()
    expect = Expect(rnd.session, rnd.round, "advertise_keys", 2)
    header, _ = unpack(adverts[2], expect)
    forged = pack(expect, {"c_pk": header["c_pk"], "s_pk": "00" * 32}, signer=forger)
    # the server drops the forger's message (client 2 counts as dropped) with a warning
    with caplog.at_level(logging.WARNING):
        u1 = rnd.server.collect_keys({**adverts, 2: forged})
    assert 2 not in u1 and "does not verify" in caplog.text
    # a server that substitutes a key in the roster is caught by the clients
    roster = rnd.server.rosters(u1)[0]
    exp0 = Expect(rnd.session, rnd.round, "share_keys", -1)
    swapped = pack(exp0, {}, pack_list([adverts[0], adverts[1], forged, adverts[3]]))
    with pytest.raises(ProtocolError, match="does not verify"):
        rnd.clients[0].share_keys(swapped)
    assert roster  # the honest roster was well formed


def test_replayed_messages_are_refused() -> None:
    rnd = _Round()
    adverts = rnd.advertise()
    other_round = Expect(rnd.session, rnd.round + 1, "advertise_keys", 1)
    with pytest.raises(ProtocolError, match="replayed"):
        unpack(adverts[1], other_round, verify=rnd.keys[1].public_key())
    other_stage = Expect(rnd.session, rnd.round, "consistency", 1)
    with pytest.raises(ProtocolError, match="replayed"):
        unpack(adverts[1], other_stage)
    other_sender = Expect(rnd.session, rnd.round, "advertise_keys", 3)
    with pytest.raises(ProtocolError, match="replayed"):
        unpack(adverts[1], other_sender)
    other_session = Expect(b"t" * 16, rnd.round, "advertise_keys", 1)
    with pytest.raises(ProtocolError, match="replayed"):
        unpack(adverts[1], other_session)


def test_tampered_messages_are_refused() -> None:
    rnd = _Round()
    adverts = rnd.advertise()
    flipped = bytearray(adverts[1])
    flipped[20] ^= 1
    with pytest.raises(ProtocolError):
        unpack(
            bytes(flipped),
            Expect(rnd.session, rnd.round, "advertise_keys", 1),
            verify=rnd.keys[1].public_key(),
        )
    with pytest.raises(ProtocolError, match=r"truncated|length"):
        unpack(adverts[1][:-3], Expect(rnd.session, rnd.round, "advertise_keys", 1))
    # a relayed share whose ciphertext was altered does not decrypt
    u1 = rnd.server.collect_keys(adverts)
    rosters = rnd.server.rosters(u1)
    rnd.server.collect_shares({c: rnd.clients[c].share_keys(rosters[c]) for c in u1})
    sealed = rnd.server.sealed[1][0]
    rnd.server.sealed[1][0] = sealed[:-2] + ("00" if sealed[-2:] != "00" else "01")
    relayed = rnd.server.relay(u1)
    with pytest.raises(ProtocolError, match="does not decrypt"):
        rnd.clients[0].masked_input(relayed[0])


def test_a_malformed_masked_input_drops_its_sender_and_the_sum_stays_exact(caplog) -> None:
    class Truncating(Network):
        def deliver(self, stage, messages):
            if stage == "masked_input":
                messages = {**messages, 3: messages[3][:-8]}
            return super().deliver(stage, messages)

    contributions = _contributions(6)
    with caplog.at_level(logging.WARNING):
        result = SecAgg(SecAggParams()).secure_sum(
            contributions,
            round=1,
            cohort=6,
            network=Truncating(None, STAGES, np.random.default_rng(0)),
        )
    assert 3 in result.dropped and "client 3" in caplog.text
    fp = FixedPoint(8.0, 6)
    scaled = np.rint(result.values * fp.scale).astype(np.int64)
    assert np.array_equal(scaled, _fixed_sum(fp, contributions, result.included))


def test_stragglers_past_the_timeout_count_as_dropped_and_the_server_waits_the_timeout() -> None:
    spec = NetworkSpec(latency_median=1.0, latency_sigma=1.5, timeout=2.0, bandwidth_mbps=8)
    network = Network(spec, ("upload",), np.random.default_rng(0))
    arrived = network.arrivals("upload", dict.fromkeys(range(40), 1_000_000))  # 1 s at 8 Mbit/s
    assert 0 < len(arrived) < 40
    assert network.gone == set(range(40)) - set(arrived)
    (cost,) = network.costs()
    assert cost.network_seconds == 2.0 and cost.clients == len(arrived)
    assert cost.bytes_up == 1_000_000 * len(arrived)
    assert network.arrivals("upload", {c: 10 for c in network.gone}) == []  # gone for the round


def test_round_scope_spreads_the_dropout_over_the_stages() -> None:
    from gradaudit.defenses.server.network import stage_dropout

    rates = stage_dropout(NetworkSpec(dropout=0.3, dropout_scope="round"), STAGES)
    survive = np.prod([1 - r for r in rates.values()])
    assert survive == pytest.approx(0.7)
