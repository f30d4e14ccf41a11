"""CKKS aggregation costs and accuracy at model scale; prints JSON.

Two encodings: gradaudit's default (``ckks`` sized for 50 clients: ring 4096, primes [49, 49],
scale 2^38) and NVIDIA FLARE's (ring 8192, primes [60, 40, 40], scale 2^40). For each, one
client's vector of `--values` floats ~ N(0, 0.05): seconds to encrypt it with the public key and
with a symmetric key (median of `--repeats`, TenSEAL threads 1 and 2), seconds to serialise it,
bytes on the wire per float32 byte, seconds to decrypt a sum; then the largest absolute error of
the decrypted sum of `--clients` such vectors against the float64 sum (the default encoding runs
the whole ``ckks`` protocol, authority key model, for this).

    OMP_NUM_THREADS=1 python bench/ckks.py --values 1000000 --clients 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import tenseal as ts
from _common import machine

from gradaudit.defenses.server.base import Contribution
from gradaudit.defenses.server.ckks import Ckks, CkksEncoding, CkksParams, check_tensor_bytes
from gradaudit.defenses.server.network import Network

STD = 0.05


def _client_values(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, STD, n)


def _timed(fn, repeats: int) -> tuple[float, object]:
    seconds, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out


def _costs(encoding: CkksEncoding, n: int, repeats: int) -> dict[str, object]:
    """One client's encryption, serialisation and expansion; decryption of one tensor."""
    values = _client_values(0, n)
    counts = np.zeros(0, dtype=np.int64)
    matrix, _ = encoding.pack(values, counts)
    row: dict[str, object] = {}
    for symmetric in (False, True):
        kind = "symmetric" if symmetric else "public_key"
        for threads in (1, 2):
            context = encoding.new_context(symmetric=symmetric, threads=threads)
            seconds, tensor = _timed(
                lambda ctx=context: ts.ckks_tensor(ctx, ts.plain_tensor(matrix), batch=True),
                repeats,
            )
            row[f"encrypt_seconds_{kind}_threads{threads}"] = round(seconds, 3)
        seconds, data = _timed(tensor.serialize, repeats)
        row[f"serialize_seconds_{kind}"] = round(seconds, 3)
        row[f"bytes_per_float32_byte_{kind}"] = round(len(data) / (4 * n), 3)
    context = encoding.new_context(symmetric=False, threads=1)
    data = ts.ckks_tensor(context, ts.plain_tensor(matrix), batch=True).serialize()
    columns = encoding.columns(n, 0)

    def decrypt() -> np.ndarray:
        check_tensor_bytes(data, encoding, columns)
        return np.array(ts.ckks_tensor_from(context, data).decrypt().raw)

    seconds, _ = _timed(decrypt, repeats)
    row["decrypt_seconds"] = round(seconds, 3)
    return row


def _protocol_error(protocol: Ckks, n: int, clients: int) -> dict[str, object]:
    """The whole ``ckks`` protocol over `clients` clients: error of the decrypted sum."""
    contributions = [
        Contribution(c, _client_values(c, n), np.array([1000 + c])) for c in range(clients)
    ]
    reference = np.sum([c.values for c in contributions], axis=0)
    network = Network(None, ("upload",), np.random.default_rng(0))
    start = time.perf_counter()
    result = protocol.secure_sum(contributions, round=1, cohort=clients, network=network)
    wall = time.perf_counter() - start
    return {
        "max_abs_error_of_sum": float(np.abs(result.values - reference).max()),
        "counts_exact": result.counts.tolist() == [sum(1000 + c for c in range(clients))],
        "protocol_wall_seconds": round(wall, 2),
        "client_seconds_total": round(result.client_seconds, 2),
        "server_seconds_total": round(result.server_seconds, 2),
        "ciphertext_expansion": round(protocol.expansion or 0.0, 3),
    }


def _direct_error(encoding: CkksEncoding, n: int, clients: int) -> dict[str, object]:
    """Public-key encryption, addition by a keyless server, decryption: error of the sum."""
    secret = encoding.new_context(symmetric=False, threads=1)
    bare = {"save_galois_keys": False, "save_relin_keys": False}
    client = ts.context_from(secret.serialize(save_public_key=True, **bare))
    server = ts.context_from(secret.serialize(save_public_key=False, **bare))
    reference = np.zeros(n)
    total = None
    start = time.perf_counter()
    for c in range(clients):
        values = _client_values(c, n)
        reference += values
        matrix, _ = encoding.pack(values, np.zeros(0, dtype=np.int64))
        data = ts.ckks_tensor(client, ts.plain_tensor(matrix), batch=True).serialize()
        tensor = ts.ckks_tensor_from(server, data)
        total = tensor if total is None else total + tensor
    assert total is not None
    summed = ts.ckks_tensor_from(secret, total.serialize())
    decrypted = np.array(summed.decrypt().raw)[:n]
    return {
        "max_abs_error_of_sum": float(np.abs(decrypted - reference).max()),
        "wall_seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-sum", action="store_true", help="time one client only")
    args = parser.parse_args()

    protocol = Ckks(CkksParams(), max_cohort=args.clients)
    configs = {
        "gradaudit_default": protocol.encoding,
        "nvflare": CkksEncoding(8192, (60, 40, 40), 40, clipping_range=8.0),
    }
    rows = {}
    for name, encoding in configs.items():
        row: dict[str, object] = {"encoding": encoding.describe()}
        row.update(_costs(encoding, args.values, args.repeats))
        if not args.skip_sum:
            if name == "gradaudit_default":
                row.update(_protocol_error(protocol, args.values, args.clients))
            else:
                row.update(_direct_error(encoding, args.values, args.clients))
        rows[name] = row
    print(
        json.dumps(
            {
                "machine": machine(),
                "tenseal": ts.__version__,
                "values": args.values,
                "clients": args.clients,
                "value_std": STD,
                "results": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
