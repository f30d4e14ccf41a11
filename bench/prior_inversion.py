"""prior_inversion against inverting_gradients at the same time budget on the same images.

The clients' images are drawn from the training split; the adversary's prior trains on the
held-out test split (granted as ``public_data``). Each attack gets ``--max-seconds`` per batch
(training the prior is timed separately: it happens once and is cached). Prints JSON.

    GRADAUDIT_DATA_DIR=../shared/datasets OMP_NUM_THREADS=1 \
        python bench/prior_inversion.py --dataset pneumoniamnist --batches 1 4 --trials 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import data_dir, machine

from gradaudit.attacks.inversion.image import InvertingGradientsAttack, InvertingGradientsParams
from gradaudit.attacks.inversion.prior import PriorInversionAttack, PriorInversionParams
from gradaudit.data import load_dataset
from gradaudit.metrics import match_reconstructions, psnr, ssim
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch
from gradaudit.types import AttackResult


def _scores(result: AttackResult, truth: torch.Tensor) -> dict[str, object]:
    """Mean PSNR/SSIM after Hungarian matching, and the per-image PSNRs."""
    rec = result.reconstruction.images
    assert rec is not None
    perm = match_reconstructions(rec, truth)
    values = psnr(rec[perm], truth)
    return {
        "psnr": round(float(values.mean()), 3),
        "ssim": round(float(ssim(rec[perm], truth).mean()), 4),
        "psnr_per_image": [round(float(v), 2) for v in values],
        "seconds": round(result.seconds, 2),
        "iterations_run": result.details["iterations_run"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--trials", type=int, default=3, help="batches attacked per batch size")
    parser.add_argument("--max-seconds", type=float, default=30.0)
    parser.add_argument("--ig-iterations", type=int, default=1000)
    parser.add_argument("--pi-iterations", type=int, default=400)
    parser.add_argument("--pi-generator-iterations", type=int, default=400)
    parser.add_argument("--prior-epochs", type=int, default=40)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--batchnorm", choices=["eval", "train"], default="eval")
    parser.add_argument("--labels", choices=["known", "recovered"], default="known")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    dataset = load_dataset(args.dataset, data_dir())
    norm = dataset.info.normalization
    assert norm is not None
    model_params: dict[str, object] = {"width": args.width} if args.model == "convnet" else {}
    model = build_model(
        args.model, model_params, dataset.info, generator=torch_generator(args.seed, "model")
    )
    public = (dataset.x_test, dataset.y_test)
    knows = ("architecture", "public_data") + (("labels",) if args.labels == "known" else ())
    ig = InvertingGradientsAttack(
        InvertingGradientsParams(
            iterations=args.ig_iterations,
            max_seconds=args.max_seconds,
            client_mode=args.batchnorm,
            max_images=max(args.batches),
        )
    )
    pi = PriorInversionAttack(
        PriorInversionParams(
            iterations=args.pi_iterations,
            generator_iterations=args.pi_generator_iterations,
            max_seconds=args.max_seconds,
            client_mode=args.batchnorm,
            max_images=max(args.batches),
            prior_epochs=args.prior_epochs,
            prior_latent_dim=args.latent_dim,
        )
    )
    picker = torch_generator(args.seed, "bench", "picks")
    probe = observe_batch(
        model,
        dataset.x_train[:1],
        dataset.y_train[:1],
        dataset.info,
        knows=knows,
        public_data=public,
    )
    prior = pi.prior(probe)
    cases = []
    for batch in args.batches:
        for trial in range(args.trials):
            idx = torch.randperm(dataset.x_train.shape[0], generator=picker)[:batch]
            x, y = dataset.x_train[idx], dataset.y_train[idx]
            truth = norm.denormalize(x).clamp(0.0, 1.0)
            obs = observe_batch(
                model,
                x,
                y,
                dataset.info,
                knows=knows,
                train_mode=args.batchnorm == "train",
                public_data=public,
            )
            row: dict[str, object] = {"batch": batch, "trial": trial, "indices": idx.tolist()}
            for name, attack in (("inverting_gradients", ig), ("prior_inversion", pi)):
                started = time.perf_counter()
                result = attack.run(obs, model, rng=torch_generator(args.seed, "attack", trial))
                scores = _scores(result, truth)
                scores["wall_seconds"] = round(time.perf_counter() - started, 2)
                if name == "prior_inversion":
                    scores["latent_objective"] = result.details["latent_objective"]
                scores["objective"] = result.details["objective"]
                row[name] = scores
            cases.append(row)
    summary = {}
    for batch in args.batches:
        rows = [c for c in cases if c["batch"] == batch]
        summary[f"batch_{batch}"] = {
            name: {
                "mean_psnr": round(sum(r[name]["psnr"] for r in rows) / len(rows), 2),
                "mean_ssim": round(sum(r[name]["ssim"] for r in rows) / len(rows), 3),
            }
            for name in ("inverting_gradients", "prior_inversion")
        }
    print(
        json.dumps(
            {
                "case": f"{args.dataset}-{args.model}-init",
                "width": args.width,
                "max_seconds": args.max_seconds,
                "batchnorm": args.batchnorm,
                "labels": args.labels,
                "ig_iterations": args.ig_iterations,
                "pi_iterations": [args.pi_iterations, args.pi_generator_iterations],
                "prior": {
                    "cache": "hit" if prior.from_cache else "miss (trained now)",
                    "seconds": round(prior.seconds, 2),
                    "examples": prior.config.examples,
                    "epochs": prior.config.epochs,
                    "latent_dim": prior.config.latent_dim,
                    "final_loss": round(prior.final_loss, 3),
                },
                "summary": summary,
                "cases": cases,
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
