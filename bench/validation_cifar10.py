"""Attacker-side validation on CIFAR-10: confidence of Inverting Gradients' reconstructions vs PSNR.

ConvNet width 64 at initialisation, BatchNorm in eval mode, labels given; the first test image of
each chosen class, attacked in batches of `--batch` (classes taken in order). For every
reconstruction: PSNR and SSIM against the truth (after matching), and the confidence of
`attacks.validation.reconstruction_confidence` with and without centring. Prints JSON.

    OMP_NUM_THREADS=1 python bench/validation_cifar10.py --iterations 100 --batch 1 --classes 0 1 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import cifar10_test_picks, machine

from gradaudit.attacks.base import attacker_model, gradient_estimate
from gradaudit.attacks.inversion.image import InvertingGradientsAttack, InvertingGradientsParams
from gradaudit.attacks.validation import reconstruction_confidence
from gradaudit.data import load_dataset
from gradaudit.metrics import match_reconstructions, psnr, ssim
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--classes", type=int, nargs="*", default=list(range(10)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dump", help="save truth, reconstructions and labels to this .npz")
    args = parser.parse_args()

    info = load_dataset("cifar10", None).info
    norm = info.normalization
    assert norm is not None
    images, labels, names = cifar10_test_picks(0)
    attack = InvertingGradientsAttack(
        InvertingGradientsParams(iterations=args.iterations, client_mode="eval")
    )
    rows = []
    dumped: dict[str, list] = {"truth": [], "rec": [], "labels": [], "start": []}
    for start in range(0, len(args.classes), args.batch):
        chosen = args.classes[start : start + args.batch]
        model = build_model(
            "convnet", {"width": 64}, info, generator=torch_generator(args.seed, "model")
        )
        pixels = torch.from_numpy(images[chosen])
        y = torch.as_tensor(labels[chosen])
        knows = ("architecture", "labels")
        obs = observe_batch(model, norm.normalize(pixels), y, info, knows=knows, train_mode=False)
        started = time.perf_counter()
        result = attack.run(obs, model, rng=torch_generator(args.seed, "attack", start))
        seconds = time.perf_counter() - started
        rec = result.reconstruction
        assert rec.images is not None and rec.labels is not None
        target, _ = gradient_estimate(obs.updates[0], obs)
        confidence = {
            centred: reconstruction_confidence(
                attacker_model(model, obs),
                norm.normalize(rec.images),
                rec.labels,
                target,
                train_mode=False,
                center=centred,
            ).confidence
            for centred in (True, False)
        }
        for key, value in (("truth", pixels), ("rec", rec.images), ("labels", rec.labels)):
            dumped[key].append(value.numpy())
        dumped["start"].append(np.full(len(chosen), start))
        perm = match_reconstructions(rec.images, pixels)
        per_psnr = psnr(rec.images[perm], pixels)
        per_ssim = ssim(rec.images[perm], pixels)
        for i, cls in enumerate(chosen):
            k = int(perm[i])
            rows.append(
                {
                    "class": names[cls],
                    "batch_start": start,
                    "psnr": round(float(per_psnr[i]), 2),
                    "ssim": round(float(per_ssim[i]), 3),
                    "confidence": round(float(confidence[True][k]), 4),
                    "raw_confidence": round(float(confidence[False][k]), 4),
                    "attack_seconds": round(seconds, 1),
                }
            )
    if args.dump:
        np.savez(args.dump, **{k: np.concatenate(v) for k, v in dumped.items()})
    print(
        json.dumps(
            {
                "case": f"cifar10-convnet-init-batch{args.batch}-validation",
                "iterations": args.iterations,
                "rows": rows,
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
