"""One-run epsilon lower bounds (Steinke et al. 2023) against the accountant's epsilon; prints JSON.

sklearn digits over `--clients` clients, an MLP, FedAvg with every client every round. For
each noise multiplier (0: no DP defense at all) it runs `gradaudit.audit.dp_audit.run_dp_audit`
at client level (DP-FedAvg, `--canaries` canary clients) and, with `--sample`, at example level
(DP-SGD, canary records).

    OMP_NUM_THREADS=1 python bench/dp_audit.py --canaries 1000 --rounds 5
"""

from __future__ import annotations

import argparse
import json

from _common import machine

from gradaudit.audit.dp_audit import run_dp_audit
from gradaudit.config import build_scenario
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--sample", action="store_true", help="also audit DP-SGD (slower)")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    data = load_dataset("digits", None)
    clients = partition_dataset(
        "iid", {}, data.y_train.numpy(), args.clients, rng=numpy_rng(0, "partition"), groups=None
    )

    def fresh():
        return build_model("mlp", {"hidden": [32]}, data.info, generator=torch_generator(0, "m"))

    levels = ["client", "sample"] if args.sample else ["client"]
    rows = []
    for level in levels:
        for noise in args.noise:
            defenses = (
                [{"kind": "dp_gaussian", "params": {"level": level, "noise_multiplier": noise}}]
                if noise > 0
                else []
            )
            scenario = build_scenario(
                {
                    "seed": 0,
                    "data": {"dataset": "digits", "num_clients": args.clients},
                    "model": {"kind": "mlp", "params": {"hidden": [32]}},
                    "federation": {
                        "algorithm": "fedavg",
                        "rounds": args.rounds,
                        "local": {"batch_size": 32, "lr": 0.1, "epochs": args.epochs},
                    },
                    "defenses": {"client": defenses},
                    "dp_audit": {"canaries": args.canaries, "level": level},
                }
            )
            report = run_dp_audit(scenario, data, clients, build_model=fresh)
            rows.append(
                {
                    "level": level,
                    "noise_multiplier": noise or None,
                    **{
                        k: report[k]
                        for k in (
                            "epsilon_lower_bound",
                            "accountant_epsilon",
                            "delta",
                            "canaries",
                            "inserted",
                            "guesses",
                            "correct",
                            "seconds",
                        )
                    },
                }
            )
    print(
        json.dumps(
            {
                "benchmark": "dp_audit",
                "setup": {
                    "dataset": "digits",
                    "clients": args.clients,
                    "rounds": args.rounds,
                    "local_epochs": args.epochs,
                    "model": "mlp [32]",
                    "confidence": 0.95,
                },
                "rows": rows,
                "machine": machine(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
