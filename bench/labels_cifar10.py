"""Label recovery on CIFAR-10 with an untrained ConvNet (width 64); prints JSON.

Batch 1: iDLG on `--images` random test images (exact label expected). Batches: label-count
accuracy (multiset overlap) of the bias-gradient method on random batches, repeats included.

    python bench/labels_cifar10.py --images 20 --batches 1 8 32 --trials 10
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import machine

from gradaudit.attacks.labels import LabelRecoveryAttack, LabelRecoveryParams
from gradaudit.data import load_dataset
from gradaudit.metrics import label_accuracy
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_dataset("cifar10", None)
    model = build_model(
        "convnet", {"width": args.width}, data.info, generator=torch_generator(args.seed, "model")
    )
    attack = LabelRecoveryAttack(LabelRecoveryParams())
    rng = np.random.default_rng(args.seed)
    rows = []
    for batch in args.batches:
        scores, exact, started = [], 0, time.perf_counter()
        for trial in range(args.trials):
            idx = torch.as_tensor(rng.choice(len(data.y_test), size=batch, replace=False))
            obs = observe_batch(model, data.x_test[idx], data.y_test[idx], data.info)
            result = attack.run(obs, model, rng=torch_generator(args.seed, "attack", trial))
            labels = result.reconstruction.labels
            scores.append(label_accuracy(labels, data.y_test[idx]))
            exact += int(sorted(labels.tolist()) == sorted(data.y_test[idx].tolist()))
        rows.append(
            {
                "batch": batch,
                "method": result.details["method"],
                "trials": args.trials,
                "mean_label_accuracy": round(float(np.mean(scores)), 4),
                "exact_batches": exact,
                "seconds_per_trial": round((time.perf_counter() - started) / args.trials, 3),
            }
        )
    print(
        json.dumps(
            {
                "case": "cifar10-convnet-init-labels",
                "width": args.width,
                "results": rows,
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
