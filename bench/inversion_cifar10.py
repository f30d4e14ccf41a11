"""Inverting Gradients on CIFAR-10 with Geiping's ConvNet at initialisation; prints JSON.

The case of issue 2/3 and breaching's reference: ConvNet width 64, random init, batch 1, labels
given to the server, BatchNorm in eval mode (breaching's setting) or train mode (a FedSGD client).

    OMP_NUM_THREADS=1 python bench/inversion_cifar10.py --iterations 1000 --classes 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import cifar10_test_picks, machine

from gradaudit.attacks.inversion.image import InvertingGradientsAttack, InvertingGradientsParams
from gradaudit.data import load_dataset
from gradaudit.metrics import psnr, ssim
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch


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
    parser.add_argument("--labels", choices=["known", "recovered"], default="known")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    info = load_dataset("cifar10", None).info  # normalisation of the training split
    assert info.normalization is not None
    images, labels, names = cifar10_test_picks(0)
    params = {
        "iterations": args.iterations,
        "restarts": args.restarts,
        "client_mode": args.batchnorm,
    }
    if args.tv is not None:
        params["tv_weight"] = args.tv
    if args.lr is not None:
        params["lr"] = args.lr
    attack = InvertingGradientsAttack(InvertingGradientsParams(**params))
    results = []
    for cls in args.classes:
        model = build_model(
            "convnet", {"width": args.width}, info, generator=torch_generator(args.seed, "model")
        )
        pixels = torch.from_numpy(images[cls : cls + 1])
        x = info.normalization.normalize(pixels)
        y = torch.tensor([int(labels[cls])])
        knows = ("architecture", "labels") if args.labels == "known" else ("architecture",)
        obs = observe_batch(model, x, y, info, knows=knows, train_mode=args.batchnorm == "train")
        started = time.perf_counter()
        result = attack.run(obs, model, rng=torch_generator(args.seed, "attack", cls))
        seconds = time.perf_counter() - started
        rec = result.reconstruction.images
        assert rec is not None
        results.append(
            {
                "class": names[cls],
                "psnr": round(float(psnr(rec, pixels)[0]), 3),
                "ssim": round(float(ssim(rec, pixels)[0]), 4),
                "seconds": round(seconds, 2),
                "objective": result.details["objective"],
                "curve": [
                    [t[0], round(t[1], 2), t[2]]
                    for t in result.trace[:: max(1, len(result.trace) // 20)]
                ],
            }
        )
    values = sorted(r["psnr"] for r in results)
    print(
        json.dumps(
            {
                "case": "cifar10-convnet-init-batch1",
                "width": args.width,
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
