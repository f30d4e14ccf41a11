"""Joint inversion of MTSamples records (fields + note) from a fusion model's update; prints JSON.

The setting of ``scenarios/mtsamples-multimodal.yaml``: ``mtsamples_fields`` (a note of 24
tokens with age, sex, age stated and note type), the ``fusion`` model at initialisation with the
scenario's sizes, one FedSGD gradient of a random training batch, the adversary knowing the
architecture, the labels, the batch size and the public (held-out) notes. For every batch
``multimodal_inversion`` runs once; its rows are scored with TabLeak's measures
(`metrics.tabular.score_rows`: categorical exact, numeric within 0.319 std, random baseline
from the held-out split's marginals) and its notes with ROUGE and token accuracy
(`metrics.text.score_texts`), each modality matched to the truth on its own.

    OMP_NUM_THREADS=1 python bench/multimodal_inversion.py --batch-sizes 1 4 --batches 5
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import data_dir, machine

from gradaudit.attacks.inversion.multimodal import (
    MultimodalInversionAttack,
    MultimodalInversionParams,
)
from gradaudit.data import load_dataset
from gradaudit.metrics.tabular import score_rows
from gradaudit.metrics.text import score_texts
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch

MODEL = {"tabular_hidden": [32], "embedding_dim": 4, "dim": 32, "heads": 2, "layers": 1}
"""The scenario's fusion model (the other sizes at their defaults)."""

FIELD_KEYS = ("feature_accuracy", "categorical_accuracy", "numeric_accuracy", "rows_exact")
TEXT_KEYS = (
    "rouge1",
    "rouge2",
    "rougeL",
    "token_accuracy",
    "token_recall",
    "token_count_accuracy",
)
KNOWS = ("architecture", "labels", "batch_size", "public_data")


def trial(data, model, index: np.ndarray, params: MultimodalInversionParams, seed: int) -> dict:
    """One batch: the attack, then both modalities scored."""
    info = data.info
    width = info.tabular.num_features
    x, y = data.x_train[index], data.y_train[index]
    obs = observe_batch(model, x, y, info, knows=KNOWS, public_data=(data.x_test, data.y_test))
    started = time.perf_counter()
    result = MultimodalInversionAttack(params).run(
        obs, model, rng=torch_generator(seed, "bench-attack", int(index[0]))
    )
    seconds = time.perf_counter() - started
    rec = result.reconstruction
    fields, _ = score_rows(rec.rows, x[:, :width], info.tabular, reference=data.x_test[:, :width])
    text, _ = score_texts(rec.tokens, x[:, width:].long(), info.text)
    true_lengths = sorted((x[:, width:] != info.text.pad_id).sum(dim=1).tolist())
    return {
        **{k: fields[k] for k in (*FIELD_KEYS, "feature_accuracy_random")},
        **{k: text[k] for k in TEXT_KEYS},
        "lengths_exact": float(sorted(result.details["note"]["lengths_final"]) == true_lengths),
        "objective": result.details["objective"],
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--batches", type=int, default=5, help="random batches per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--restarts", type=int, default=None)
    parser.add_argument("--prior-weight", type=float, default=None)
    parser.add_argument("--init", choices=["auto", "positions", "random"], default=None)
    parser.add_argument(
        "--tensor-blocks",
        action="store_true",
        help="ablation: compare whole tensors, not every looked-up embedding row on its own",
    )
    args = parser.parse_args()
    overrides = {
        k: v
        for k, v in {
            "iterations": args.iterations,
            "restarts": args.restarts,
            "prior_weight": args.prior_weight,
            "init": args.init,
            "row_blocks": False if args.tensor_blocks else None,
        }.items()
        if v is not None
    }
    params = MultimodalInversionParams(**overrides)
    data = load_dataset("mtsamples_fields", data_dir())
    model = build_model("fusion", MODEL, data.info, generator=torch_generator(args.seed, "model"))
    order = torch.randperm(
        len(data.y_train), generator=torch_generator(args.seed, "bench-batches")
    ).numpy()
    out: dict[str, object] = {
        "machine": machine(),
        "recipe": params.model_dump(),
        "model": MODEL,
        "batches": args.batches,
    }
    for size in args.batch_sizes:
        trials = [
            trial(data, model, order[b * size : (b + 1) * size], params, args.seed)
            for b in range(args.batches)
        ]
        out[f"batch_{size}"] = {
            "mean": {k: float(np.mean([t[k] for t in trials])) for k in trials[0]},
            "std": {k: float(np.std([t[k] for t in trials])) for k in trials[0]},
            "per_batch": trials,
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
