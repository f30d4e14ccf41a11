"""Aggregation over an unreliable network: success rate and round time against dropout, for
plain uploads, ``secagg`` and ``ckks``; prints JSON.

`--clients` (50) clients hold ``normal(0, 0.05, --values)`` vectors (10k entries) with counts
``[100]``. The network is ``NetworkSpec(latency_median=0.05, latency_sigma=0.5,
bandwidth_mbps=20, timeout=5.0)`` with ``dropout`` 0, 0.1 and 0.3 under both scopes: ``stage``
(each client still in the round drops with that probability at every stage of the protocol, so a
five-stage protocol loses more clients than a one-stage upload) and ``round`` (the probability a
client drops somewhere in the round, spread over the protocol's stages: the fair comparison).
Dropout 0 is the same network under both scopes, so it runs once and is reported under both.

Protocols: ``plain`` (each client casts its vector to float32 and uploads 4 bytes per entry
through ``Network.arrivals("upload", ...)``; the server sums what arrives with numpy),
``secagg_n13`` (13 neighbours, threshold 0.5), ``secagg_complete`` (complete graph),
``secagg_n13_t1/3`` (13 neighbours, threshold 1/3) and ``ckks`` (authority key model, sized for
the cohort; its keys are made and provisioned in an untimed warm-up round, so the rounds measure
the steady state). Each cell runs `--rounds` (30) rounds, round r on network seed
``--seed + r`` (the same seeds for every protocol and cell).

Per cell: success rate (the round produced an aggregate: ``secure_sum`` returned rather than
raising ``AggregationAbortedError``; plain succeeds when at least one upload arrives), why the
others aborted, the protocol's warnings per round (clients that refuse to go on, messages the
server rejects), mean clients included / dropped / recovered over successful rounds, and the mean
round time over successful rounds: compute (client_seconds / clients, the clients running in
parallel, + server_seconds) + simulated network seconds (``SecureSum.network_seconds``). An
aborted round's time is its network seconds until the abort plus the wall time of
``secure_sum`` (an upper bound on its compute: the clients ran one after another). Also bytes up
per client of the cohort (successful rounds) and the rounds in which some stage waited the whole
timeout (a straggler). Degradation, per protocol and scope: the success-rate drop from dropout 0
to each level (points, and relative to the rate at 0), and the relative growth of the mean
successful round time. ``secagg`` draws its share graph from the operating system's CSPRNG, so
its cells vary between runs beyond the network seeds (a success rate over 30 rounds is good to
about ±9 points).

    OMP_NUM_THREADS=1 python bench/unreliable_network.py
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np
from _common import machine

from gradaudit.config import NetworkSpec
from gradaudit.defenses.server.base import AggregationAbortedError, Contribution
from gradaudit.defenses.server.network import Network
from gradaudit.defenses.server.secagg.protocol import SecAgg, SecAggParams

STD = 0.05
COUNTS = (100,)
DROPOUTS = (0.0, 0.1, 0.3)
SCOPES = ("round", "stage")
NETWORK = {"latency_median": 0.05, "latency_sigma": 0.5, "bandwidth_mbps": 20.0, "timeout": 5.0}


class _Refusals(logging.Handler):
    """Counts the protocol's warnings (a client that stops, a message the server rejects)
    instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


REFUSALS = _Refusals()


def _ckks(clients: int) -> tuple[Any, str | None]:
    """A ``ckks`` protocol for `clients`, or None and why it is unavailable."""
    try:
        from gradaudit.defenses.server.ckks import Ckks, CkksParams

        return Ckks(CkksParams(), max_cohort=clients), None
    except Exception as exc:  # the module is being written: any failure means "not usable"
        return None, f"{type(exc).__name__}: {exc}"


def _protocols(names: list[str], clients: int) -> tuple[dict[str, Any], dict[str, str]]:
    made: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name == "plain":
            made[name] = None
        elif name == "secagg_n13":
            made[name] = SecAgg(SecAggParams(neighbours=13))
        elif name == "secagg_complete":
            made[name] = SecAgg(SecAggParams(neighbours=None))
        elif name == "secagg_n13_t1/3":
            made[name] = SecAgg(SecAggParams(neighbours=13, threshold=1 / 3))
        elif name == "ckks":
            protocol, why = _ckks(clients)
            if protocol is None:
                skipped[name] = why or "unavailable"
            else:
                made[name] = protocol
        else:
            raise SystemExit(f"unknown protocol {name!r}")
    return made, skipped


def _plain_round(contributions: list[Contribution], network: Network) -> dict[str, Any]:
    """A plain float32 upload through `network` and the server's numpy sum."""
    n = contributions[0].values.size
    start = time.perf_counter()
    uploads = {c.client_id: c.values.astype(np.float32) for c in contributions}
    client_seconds = time.perf_counter() - start
    arrived = network.arrivals("upload", {c: 4 * n for c in uploads})
    network_seconds = sum(s.network_seconds for s in network.costs())
    if not arrived:
        return {"aborted": "no upload arrived", "network_seconds": network_seconds}
    start = time.perf_counter()
    total = np.zeros(n, dtype=np.float32)
    for c in arrived:
        np.add(total, uploads[c], out=total)
    server_seconds = time.perf_counter() - start
    return {
        "compute_seconds": client_seconds / len(contributions) + server_seconds,
        "network_seconds": network_seconds,
        "included": len(arrived),
        "dropped": len(contributions) - len(arrived),
        "recovered": 0,
    }


def _protocol_round(
    protocol: Any, contributions: list[Contribution], network: Network, rnd: int
) -> dict[str, Any]:
    clients = len(contributions)
    start = time.perf_counter()
    try:
        result = protocol.secure_sum(contributions, round=rnd, cohort=clients, network=network)
    except AggregationAbortedError as exc:
        wall = time.perf_counter() - start
        return {
            "aborted": str(exc),
            "network_seconds": sum(s.network_seconds for s in network.costs()),
            "wall_seconds": wall,
        }
    return {
        "compute_seconds": result.client_seconds / clients + result.server_seconds,
        "network_seconds": result.network_seconds,
        "included": len(result.included),
        "dropped": len(result.dropped),
        "recovered": len(result.recovered),
    }


def _reason(message: str) -> str:
    """A short name for why a round aborted."""
    if (match := re.search(r"at stage (\w+)", message)) is not None:
        return f"too few clients at {match.group(1)}"
    if "share holders revealed" in message:
        return "too few shares at unmasking"
    return message[:80]


def _mean(values: list[float], digits: int = 3) -> float | None:
    return round(statistics.fmean(values), digits) if values else None


def _cell(
    protocol: Any,
    contributions: list[Contribution],
    spec: NetworkSpec,
    rounds: int,
    seed: int,
    first_round: int,
) -> dict[str, Any]:
    stages = ("upload",) if protocol is None else protocol.stages
    rows = []
    REFUSALS.count = 0
    for r in range(rounds):
        network = Network(spec, stages, np.random.default_rng(seed + r))
        if protocol is None:
            row = _plain_round(contributions, network)
        else:
            row = _protocol_round(protocol, contributions, network, first_round + r)
        costs = network.costs()
        row["straggler"] = any(c.network_seconds >= spec.timeout for c in costs)
        row["bytes_up"] = sum(c.bytes_up for c in costs) / len(contributions)
        rows.append(row)
    done = [r for r in rows if "aborted" not in r]
    failed = [r for r in rows if "aborted" in r]
    times = [r["compute_seconds"] + r["network_seconds"] for r in done]
    failed_times = [r["network_seconds"] + r.get("wall_seconds", 0.0) for r in failed]
    return {
        "rounds": rounds,
        "success_rate": round(len(done) / rounds, 4),
        "aborts": dict(Counter(_reason(r["aborted"]) for r in failed)),
        "protocol_warnings_per_round": round(REFUSALS.count / rounds, 2),
        "included_mean": _mean([r["included"] for r in done], 2),
        "dropped_mean": _mean([r["dropped"] for r in done], 2),
        "recovered_mean": _mean([r["recovered"] for r in done], 2),
        "round_seconds_mean": _mean(times),
        "compute_seconds_mean": _mean([r["compute_seconds"] for r in done], 4),
        "network_seconds_mean": _mean([r["network_seconds"] for r in done]),
        "aborted_round_seconds_mean": _mean(failed_times),
        "bytes_up_per_client_mean": _mean([r["bytes_up"] for r in done], 1),
        "rounds_with_straggler": sum(r["straggler"] for r in rows),
    }


def _degradation(cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    base = cells["0.0"]
    out = {}
    for level, cell in cells.items():
        if level == "0.0":
            continue
        drop = base["success_rate"] - cell["success_rate"]
        t0, t = base["round_seconds_mean"], cell["round_seconds_mean"]
        out[level] = {
            "success_rate_drop_points": round(100 * drop, 1),
            "success_rate_drop_relative": round(drop / base["success_rate"], 3)
            if base["success_rate"]
            else None,
            "round_seconds_growth_relative": round(t / t0 - 1, 3) if t0 and t else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--values", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0, help="network seed of the first round")
    parser.add_argument(
        "--protocols",
        default="plain,secagg_n13,secagg_complete,secagg_n13_t1/3,ckks",
        help="comma-separated subset",
    )
    args = parser.parse_args()
    library = logging.getLogger("gradaudit")
    library.addHandler(REFUSALS)
    library.propagate = False
    contributions = [
        Contribution(c, np.random.default_rng(c).normal(0.0, STD, args.values), np.array(COUNTS))
        for c in range(args.clients)
    ]
    protocols, skipped = _protocols(args.protocols.split(","), args.clients)
    if "ckks" in protocols:  # keys and provisioning once, outside the measured rounds
        warm = Network(None, protocols["ckks"].stages, np.random.default_rng(0))
        protocols["ckks"].secure_sum(contributions, round=0, cohort=args.clients, network=warm)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name, protocol in protocols.items():
        began = time.perf_counter()
        rnd = 1
        base = _cell(
            protocol,
            contributions,
            NetworkSpec(dropout=0.0, **NETWORK),
            args.rounds,
            args.seed,
            rnd,
        )
        rnd += args.rounds
        row: dict[str, Any] = {}
        for scope in SCOPES:
            cells = {"0.0": base}
            for dropout in DROPOUTS[1:]:
                spec = NetworkSpec(dropout=dropout, dropout_scope=scope, **NETWORK)
                cells[str(dropout)] = _cell(
                    protocol, contributions, spec, args.rounds, args.seed, rnd
                )
                rnd += args.rounds
            row[scope] = {"by_dropout": cells, "degradation": _degradation(cells)}
        row["stages"] = 1 if protocol is None else len(protocol.stages)
        row["bench_seconds"] = round(time.perf_counter() - began, 1)
        results[name] = row
    print(
        json.dumps(
            {
                "machine": machine(),
                "clients": args.clients,
                "values": args.values,
                "rounds": args.rounds,
                "network": NETWORK,
                "dropouts": list(DROPOUTS),
                "skipped": skipped,
                "results": results,
                "bench_seconds": round(time.perf_counter() - started, 1),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
