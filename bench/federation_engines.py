"""Seconds per FedAvg round, vectorised (torch.func vmap) vs the plain loop engine; prints JSON.

Many clients of a small model: sklearn digits over `--clients` clients, MLP, one local epoch.

    OMP_NUM_THREADS=1 python bench/federation_engines.py --clients 100 --rounds 10

The first round of each engine is timed apart (vmap's one-time start-up), then `--rounds` more.
"""

from __future__ import annotations

import argparse
import json
import time

from _common import machine

from gradaudit.config import FederationSpec
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.federation import run_federation
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--hidden", type=int, nargs="*", default=[64])
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    data = load_dataset("digits", None)
    clients = partition_dataset(
        "iid", {}, data.y_train.numpy(), args.clients, rng=numpy_rng(0, "p"), groups=None
    )
    rows = {}
    for engine in ("vectorised", "loop"):
        model = build_model(
            "mlp", {"hidden": args.hidden}, data.info, generator=torch_generator(0, "m")
        )
        spec = FederationSpec(
            algorithm="fedavg",
            rounds=args.rounds,
            engine=engine,
            local={"epochs": 1, "batch_size": args.batch_size, "lr": 0.1},
        )
        warm = spec.model_copy(update={"rounds": 1})
        started = time.perf_counter()
        run_federation(model, data, clients, warm, seed=0)  # first call: one-time start-up
        first = time.perf_counter() - started
        started = time.perf_counter()
        result = run_federation(model, data, clients, spec, seed=0)
        rows[engine] = {
            "first_round_seconds": round(first, 4),
            "seconds_per_round": round((time.perf_counter() - started) / args.rounds, 4),
            "final_test_accuracy": round(result.rounds[-1].test_accuracy, 4),
        }
    speedup = rows["loop"]["seconds_per_round"] / rows["vectorised"]["seconds_per_round"]
    print(
        json.dumps(
            {
                "case": "fedavg-digits-mlp",
                "clients": args.clients,
                "hidden": args.hidden,
                "batch_size": args.batch_size,
                "engines": rows,
                "speedup": round(speedup, 2),
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
