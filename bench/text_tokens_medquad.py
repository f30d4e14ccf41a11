"""text_tokens on MedQuAD inside the federation of scenarios/medquad-text.yaml; prints JSON.

For each client batch size and defense variant, the federation runs `--rounds` FedSGD rounds
(every round captured), and every client's update of every round is attacked at each rtol:
token recall, precision and count accuracy against the client's true batch (`metrics.bag`),
the share of batch-1 sequences recovered in order (and how many of the sequences it gave were
wrong), and the seconds of one federation round (wall clock: training, defenses, aggregation
and the test evaluation; and the federation's own per-round client and server compute).

    OMP_NUM_THREADS=1 python bench/text_tokens_medquad.py --batches 1 4 16 --rounds 5
    OMP_NUM_THREADS=1 python bench/text_tokens_medquad.py --batches 1 --count-tol 0.4 \
        --variants "noise 0.0001" "noise 0.001"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from _common import data_dir, machine

from gradaudit.attacks.inversion.tokens import TextTokensAttack, TextTokensParams
from gradaudit.config import load_scenario
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.defenses import build_defenses
from gradaudit.defenses.base import DefenseContext
from gradaudit.federation.loop import run_federation
from gradaudit.metrics.bag import bag_metrics, true_bag
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator
from gradaudit.threat.observe import observe

REPO = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, list[str]] = {
    "no defense": [],
    # dp_gaussian level local with a clip that rarely binds: additive noise of the given std per
    # entry on the update the server sees (the defense sweep's "noise" rows)
    **{
        f"noise {std:g}": [
            "defenses.client=[{kind: dp_gaussian, params: {level: local, clip_norm: 30, "
            f"noise_multiplier: {std / 30:.6g}}}}}]"
        ]
        for std in (1e-4, 1e-3, 1e-2)
    },
    "DP-SGD z=1 C=1": [
        "defenses.client=[{kind: dp_gaussian, params: {level: sample, clip_norm: 1, "
        "noise_multiplier: 1.0}}]"
    ],
}


def run_variant(
    batch: int, variant: str, rounds: int, rtols: list[float], count_tol: float
) -> list[dict[str, object]]:
    """Metrics of every client's update over `rounds` rounds at each rtol."""
    sets = [
        f"federation.local.batch_size={batch}",
        f"federation.rounds={rounds}",
        "threat.knows=[architecture, batch_size]",  # all text_tokens reads
        *VARIANTS[variant],
    ]
    scenario = load_scenario(REPO / "scenarios" / "medquad-text.yaml", sets)
    seed = scenario.seed
    dataset = load_dataset(scenario.data.dataset, data_dir())
    clients = partition_dataset(
        scenario.data.partition.kind,
        scenario.data.partition.params,
        dataset.y_train.numpy(),
        scenario.data.num_clients,
        rng=numpy_rng(seed, "partition"),
        groups=None,
        dataset=scenario.data.dataset,
    )
    model = build_model(
        scenario.model.kind,
        scenario.model.params,
        dataset.info,
        generator=torch_generator(seed, "model"),
    )
    context = DefenseContext(
        model, scenario.federation, tuple(len(c) for c in clients), dataset.info, seed
    )
    defenses, protocol = build_defenses(scenario.defenses, context)
    started = time.perf_counter()
    fed = run_federation(
        model,
        dataset,
        clients,
        scenario.federation,
        seed=seed,
        capture_rounds=set(range(1, rounds + 1)),
        defenses=defenses,
        protocol=protocol,
    )
    round_seconds = (time.perf_counter() - started) / len(fed.rounds)
    rows = []
    for rtol in rtols:
        attack = TextTokensAttack(TextTokensParams(rtol=rtol, count_tol=count_tol))
        scores: list[dict[str, float]] = []
        ordered, attack_seconds, skipped, wrong = [], [], 0, 0
        for capture in fed.captures.values():
            seen = observe(
                scenario.threat, capture, scenario.federation, dataset.info, dataset.y_train
            )
            for update in capture.updates:
                plan = capture.plans[update.client_id]
                obs = dataclasses.replace(seen, target_client=update.client_id)
                result = attack.run(obs, model, rng=torch_generator(seed, "attack", 0))
                if result.status != "ok" or plan.used.size == 0:
                    skipped += 1  # DP-SGD's Poisson batch can be empty
                    continue
                x = dataset.x_train[torch.as_tensor(plan.used)]
                truth, item = true_bag(x, dataset.info)
                scores.append(bag_metrics(result.reconstruction.bag, truth, item=item))
                attack_seconds.append(result.seconds)
                if batch == 1:
                    tokens = result.reconstruction.tokens
                    ordered.append(tokens is not None and torch.equal(tokens, x.long()))
                    wrong += int(tokens is not None and not ordered[-1])
        rows.append(
            {
                "batch": batch,
                "variant": variant,
                "rtol": rtol,
                "count_tol": count_tol,
                "updates": len(scores),
                "skipped": skipped,
                **{k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]},
                "min_token_recall": round(min(s["token_recall"] for s in scores), 4),
                "ordered_exactly": round(float(np.mean(ordered)), 4) if ordered else None,
                "ordered_wrongly": wrong if ordered else None,
                "attack_seconds": round(float(np.mean(attack_seconds)), 4),
                "round_seconds": round(round_seconds, 3),
                "client_seconds": round(fed.cost.client_seconds, 4),
                "server_seconds": round(fed.cost.server_seconds, 4),
                "engine": fed.engine,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rtols", type=float, nargs="*", default=[0.0, 0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--count-tol", type=float, default=0.01, help="text_tokens count_tol")
    args = parser.parse_args()
    rows = []
    for variant in args.variants:
        rtols = [0.0] if variant == "no defense" else args.rtols
        for batch in args.batches:
            rows.extend(run_variant(batch, variant, args.rounds, rtols, args.count_tol))
    summary = {"case": "medquad-text-tokens", "results": rows, "machine": machine()}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
