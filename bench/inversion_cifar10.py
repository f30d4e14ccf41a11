"""Inverting Gradients on CIFAR-10 with Geiping's ConvNet; prints JSON.

The case of issue 2/3 and breaching's reference: ConvNet width 64, random init, batch 1, labels
given to the server, BatchNorm in eval mode (breaching's setting) or train mode (a FedSGD client).
Variants: larger batches (``--batch``: test images of consecutive classes), a trained checkpoint
(``--trained-epochs``), and a FedAvg client with several local steps (``--fedavg-batch``).

    OMP_NUM_THREADS=1 python bench/inversion_cifar10.py --iterations 1000 --classes 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import yaml
from _common import cifar10_test_picks, machine, trained_convnet

from gradaudit.attacks.inversion.image import InvertingGradientsAttack, InvertingGradientsParams
from gradaudit.data import load_dataset
from gradaudit.metrics import match_reconstructions, psnr, ssim
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch, observe_fedavg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument(
        "--classes",
        type=int,
        nargs="*",
        default=[1],
        help="CIFAR-10 classes whose test image #0 is attacked (1 = automobile)",
    )
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batchnorm", choices=["eval", "train"], default="eval")
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--tv", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--schedule", choices=["step", "cosine", "constant"], default=None)
    parser.add_argument("--init", choices=["randn", "rand", "zeros"], default=None)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--batch", type=int, default=1, help="images per update")
    parser.add_argument(
        "--trained-epochs", type=int, default=0, help="attack a checkpoint trained this long"
    )
    parser.add_argument(
        "--fedavg-batch",
        type=int,
        default=None,
        help="FedAvg: the client runs one epoch over its --batch images in local batches of "
        "this size (e.g. --batch 4 --fedavg-batch 1 = 4 local steps); default FedSGD",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other inverting_gradients parameter (YAML value), e.g. --param bn_weight=0.1",
    )
    parser.add_argument("--local-lr", type=float, default=0.01, help="FedAvg local lr")
    parser.add_argument(
        "--unroll", choices=["auto", "always", "never"], default="auto", help="FedAvg replay"
    )
    parser.add_argument("--labels", choices=["known", "recovered"], default="known")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    info = load_dataset("cifar10", None).info  # normalisation of the training split
    assert info.normalization is not None
    picks = [cifar10_test_picks(k) for k in range(2)]
    images = np.concatenate([p[0] for p in picks])  # class c's image #0 at c, #1 at 10 + c
    labels = np.concatenate([p[1] for p in picks])
    names = picks[0][2]
    model, accuracy = trained_convnet(args.width, args.trained_epochs, seed=args.seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {
        "iterations": args.iterations,
        "restarts": args.restarts,
        "client_mode": args.batchnorm,
        "unroll": args.unroll,
    }
    if args.tv is not None:
        params["tv_weight"] = args.tv
    for key in ("lr", "schedule", "init", "max_seconds"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    for item in args.param:
        key, _, value = item.partition("=")
        params[key] = yaml.safe_load(value)
    attack = InvertingGradientsAttack(InvertingGradientsParams(**params))
    results = []
    for cls in args.classes:
        model.load_state_dict(global_state)
        rows = [(cls + k) % len(images) for k in range(args.batch)]
        pixels = torch.from_numpy(images[rows])
        x = info.normalization.normalize(pixels)
        y = torch.from_numpy(labels[rows])
        knows = ("architecture", "labels") if args.labels == "known" else ("architecture",)
        if args.fedavg_batch is None:
            obs = observe_batch(
                model, x, y, info, knows=knows, train_mode=args.batchnorm == "train"
            )
        else:
            obs = observe_fedavg(
                model,
                x,
                y,
                info,
                lr=args.local_lr,
                batch_size=args.fedavg_batch,
                knows=(*knows, "local_hyperparameters"),
                batchnorm="train" if args.batchnorm == "train" else "frozen",
            )
        started = time.perf_counter()
        result = attack.run(obs, model, rng=torch_generator(args.seed, "attack", cls))
        seconds = time.perf_counter() - started
        rec = result.reconstruction.images
        assert rec is not None
        perm = match_reconstructions(rec, pixels)
        results.append(
            {
                "class": names[cls],
                "psnr": round(float(psnr(rec[perm], pixels).mean()), 3),
                "ssim": round(float(ssim(rec[perm], pixels).mean()), 4),
                "seconds": round(seconds, 2),
                "iterations_run": result.details["iterations_run"],
                "replay": result.details["replay"],
                "objective": result.details["objective"],
                "psnr_curve": [
                    [
                        round(t, 2),
                        round(float(psnr(im[match_reconstructions(im, pixels)], pixels).mean()), 2),
                    ]
                    for t, im in result.snapshots
                ],
            }
        )
    values = sorted(r["psnr"] for r in results)
    print(
        json.dumps(
            {
                "case": "cifar10-convnet",
                "width": args.width,
                "batch": args.batch,
                "trained_epochs": args.trained_epochs,
                "test_accuracy": accuracy,
                "fedavg_batch": args.fedavg_batch,
                "params": params,
                "iterations": args.iterations,
                "restarts": args.restarts,
                "batchnorm": args.batchnorm,
                "labels": args.labels,
                "median_psnr": values[len(values) // 2],
                "results": results,
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
