"""DLG on the sigmoid LeNet of Zhu et al. with CIFAR-10, batch 1; prints JSON.

breaching's reference on this machine: 35.8 dB in 19 s (300 L-BFGS steps) on test image
"automobile" #0. Labels are optimised jointly unless --labels known.

    OMP_NUM_THREADS=1 python bench/dlg_lenet_cifar10.py --iterations 300 --max-seconds 5
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _common import cifar10_test_picks, machine

from gradaudit.attacks.inversion.dlg import DLGAttack, DLGParams
from gradaudit.data import load_dataset
from gradaudit.metrics import psnr, ssim
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--classes", type=int, nargs="*", default=[1])
    parser.add_argument("--labels", choices=["known", "optimised"], default="optimised")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    info = load_dataset("cifar10", None).info
    assert info.normalization is not None
    images, labels, names = cifar10_test_picks(0)
    attack = DLGAttack(DLGParams(iterations=args.iterations, max_seconds=args.max_seconds))
    results = []
    for cls in args.classes:
        model = build_model("lenet", {}, info, generator=torch_generator(args.seed, "model"))
        pixels = torch.from_numpy(images[cls : cls + 1])
        y = torch.tensor([int(labels[cls])])
        knows = ("architecture", "labels") if args.labels == "known" else ("architecture",)
        obs = observe_batch(model, info.normalization.normalize(pixels), y, info, knows=knows)
        started = time.perf_counter()
        result = attack.run(obs, model, rng=torch_generator(args.seed, "attack", cls))
        seconds = time.perf_counter() - started
        rec = result.reconstruction.images
        assert rec is not None and result.reconstruction.labels is not None
        results.append(
            {
                "class": names[cls],
                "psnr": round(float(psnr(rec, pixels)[0]), 2),
                "ssim": round(float(ssim(rec, pixels)[0]), 4),
                "label_right": result.reconstruction.labels.tolist() == y.tolist(),
                "steps": result.details["iterations_run"],
                "seconds": round(seconds, 2),
            }
        )
    print(
        json.dumps(
            {
                "case": "cifar10-lenet-dlg-batch1",
                "iterations": args.iterations,
                "max_seconds": args.max_seconds,
                "labels": args.labels,
                "results": results,
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
