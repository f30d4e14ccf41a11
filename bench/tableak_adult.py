"""TabLeak on UCI Adult (and Heart Disease): feature accuracy vs batch size; prints JSON.

TabLeak's setting (Vero et al., ICML 2023, §6): the one-hot FC network 6+107-100-100-2
(``tabular_mlp`` with ``encoding: onehot``, hidden [100, 100]) at initialisation, one FedSGD
gradient of a random training batch, labels known, 30 restarts of 1500 signed-Adam steps pooled
by the median. Each batch is scored against the truth after matching (categorical exact,
numeric within 0.319 std) next to TabLeak's random baseline (features drawn from the held-out
split's marginals). ``categorical_codes`` runs on the same gradients. Ablations at the
``--ablate`` sizes rerun the same batches without the support restriction and without the
consistency rules.

    OMP_NUM_THREADS=1 python bench/tableak_adult.py
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import data_dir, machine

from gradaudit.attacks.inversion.codes import CategoricalCodesAttack, CategoricalCodesParams
from gradaudit.attacks.inversion.tabular import TabularInversionAttack, TabularInversionParams
from gradaudit.data import load_dataset
from gradaudit.data.base import Dataset
from gradaudit.metrics.bag import bag_metrics, true_bag
from gradaudit.metrics.tabular import TABLEAK_TOLERANCE, score_rows, wrong_features
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch

KEYS = (
    "feature_accuracy",
    "categorical_accuracy",
    "numeric_accuracy",
    "rows_exact",
    "feature_accuracy_random",
    "kept_feature_accuracy",
    "confident_quarter_accuracy",
    "code_recall",
    "code_count_accuracy",
    "seconds",
)


def confident_quarter(
    rows: torch.Tensor, truth: torch.Tensor, perm: torch.Tensor, confidence: torch.Tensor, schema
) -> float:
    """Feature accuracy of the quarter of rows the attacker is surest of (its own confidence,
    from the entropy across restarts): TabLeak's point that low entropy marks right features."""
    wrong = wrong_features(rows[perm], truth, schema, tolerance=TABLEAK_TOLERANCE)
    right = (~wrong).to(torch.float64).mean(dim=1)
    top = torch.argsort(confidence[perm], descending=True)[: max(1, len(perm) // 4)]
    return float(right[top].mean())


def one_trial(
    data: Dataset, model: torch.nn.Module, idx: torch.Tensor, params: dict, seed: int, knows: tuple
) -> dict[str, float]:
    """Attack one batch and score it."""
    x, y = data.x_train[idx], data.y_train[idx]
    obs = observe_batch(model, x, y, data.info, knows=knows)
    attack = TabularInversionAttack(TabularInversionParams(**params))
    result = attack.run(obs, model, rng=torch_generator(seed, "attack", int(idx[0])))
    rec = result.reconstruction
    metrics, perm = score_rows(rec.rows, x, data.info.tabular, kept=rec.kept, reference=data.x_test)
    metrics["confident_quarter_accuracy"] = confident_quarter(
        rec.rows, x, perm, rec.confidence, data.info.tabular
    )
    codes = CategoricalCodesAttack(CategoricalCodesParams()).run(obs, model, rng=torch.Generator())
    truth, item = true_bag(x, data.info)
    metrics.update(bag_metrics(codes.reconstruction.bag, truth, item=item))
    metrics["seconds"] = result.seconds
    return metrics


def summarise(trials: list[dict[str, float]]) -> dict[str, object]:
    """``[mean, std]`` of every metric over the trials."""
    out: dict[str, object] = {"trials": len(trials)}
    for key in KEYS:
        values = [t[key] for t in trials if key in t]
        if values:
            out[key] = [round(float(np.mean(values)), 4), round(float(np.std(values)), 4)]
    return out


def run_case(
    data: Dataset, model: torch.nn.Module, batch: int, trials: int, params: dict, args
) -> dict[str, object]:
    """`trials` random batches of `batch` rows (the same batches for the same seed)."""
    rng = np.random.default_rng([args.seed, batch])
    knows = ("architecture", "labels") if args.labels == "known" else ("architecture",)
    results = []
    for _ in range(trials):
        idx = torch.as_tensor(rng.choice(len(data.y_train), size=batch, replace=False))
        results.append(one_trial(data, model, idx, params, args.seed, knows))
    return {"batch": batch, **summarise(results)}


def tableak_model(data: Dataset, seed: int) -> torch.nn.Module:
    """TabLeak's FC network at initialisation."""
    params = {"hidden": [100, 100], "encoding": "onehot"}
    return build_model("tabular_mlp", params, data.info, generator=torch_generator(seed, "model"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 16, 32, 64, 128])
    parser.add_argument("--trials", type=int, nargs="*", default=[6, 4, 3, 2, 1])
    parser.add_argument("--ablate", type=int, nargs="*", default=[8, 32])
    parser.add_argument("--ablate-trials", type=int, default=3)
    parser.add_argument("--heart-trials", type=int, default=6)
    parser.add_argument("--restarts", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--labels", choices=["known", "recovered"], default="known")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if len(args.trials) != len(args.batches):
        parser.error("give one --trials count per --batches size")
    started = time.perf_counter()
    recipe = {"restarts": args.restarts, "iterations": args.iterations}

    adult = load_dataset("adult", data_dir())
    model = tableak_model(adult, args.seed)
    curve = [
        run_case(adult, model, batch, trials, recipe, args)
        for batch, trials in zip(args.batches, args.trials, strict=True)
    ]
    ablations = []
    for batch in args.ablate:
        for name, change in (
            ("all codes (no support restriction)", {"restrict_support": False}),
            ("no consistency rules", {"consistency": "off"}),
        ):
            case = run_case(adult, model, batch, args.ablate_trials, {**recipe, **change}, args)
            ablations.append({"variant": name, **case})
    heart = load_dataset("heart_disease", data_dir())
    heart_case = run_case(
        heart, tableak_model(heart, args.seed), 8, args.heart_trials, recipe, args
    )
    print(
        json.dumps(
            {
                "case": "tableak-adult-onehot-100-100-init-fedsgd",
                "labels": args.labels,
                "values": "[mean, std] over the trials (random batches)",
                "recipe": recipe,
                "adult": curve,
                "adult_ablations": ablations,
                "heart_disease": heart_case,
                "total_seconds": round(time.perf_counter() - started, 1),
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
