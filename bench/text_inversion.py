"""text_inversion on MedQuAD: a transformer at initialisation, FedSGD, 1 x 16 and 4 x 16 tokens.

Each trial draws a batch of training sequences (MedQuAD: question + start of the answer, 16
tokens; ``--dataset mtsamples``: the first 32 tokens of a clinical note), takes the client's
exact FedSGD gradient of the freshly initialised model (`observe_batch`), grants the labels,
the architecture and the held-out test split as public text (the prior's corpus), and attacks
it with each method; the reconstruction is scored by
`metrics.text.score_texts` (sentences matched by ROUGE-1). Methods:

* ``text_inversion``: the attack's defaults (for one sequence it starts from the order the
  position-embedding gradient gives);
* ``text_inversion (init=random)``: the same, from random embeddings only;
* ``TAG``: continuous optimisation only (L2 + 0.01 L1, Adam lr 0.1, up to 2500 steps as in
  LAMP's TAG baseline), no discrete step, no prior, no polish;
* ``LAMP``: LAMP's cosine setting (lr 0.01 decayed to 1 %, embedding-norm regulariser 1,
  2000 steps, discrete steps of 200 candidates every 75 steps ranked with the n-gram prior at
  weight 0.2), no polish.

Prints JSON (per method and batch size: mean and standard deviation of each metric and of the
seconds, and the share of batches recovered exactly).

    OMP_NUM_THREADS=1 python bench/text_inversion.py --batches 1 4 --trials 5
    OMP_NUM_THREADS=1 python bench/text_inversion.py --dataset mtsamples --batches 1 4
    OMP_NUM_THREADS=1 python bench/text_inversion.py --withhold-token-embedding

``--train-steps N`` attacks a model trained first (N steps of SGD, batch 8, lr 0.3 on the
training split: FedSGD's trajectory without the federation) instead of one at initialisation.

``--withhold-token-embedding`` removes the token embedding's gradient from the update (as a
client that keeps that layer private would), so the attack gets no token set and searches the
whole vocabulary (breaching's TAG reads the token set off that gradient when it has it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch
from _common import data_dir, machine

from gradaudit.attacks.inversion.text import TextInversionAttack, TextInversionParams
from gradaudit.attacks.inversion.tokens import token_embedding_key
from gradaudit.data import load_dataset
from gradaudit.metrics.text import score_texts
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch

METHODS: dict[str, dict[str, object]] = {
    "text_inversion": {},
    "text_inversion (init=random)": {"init": "random"},
    "TAG": {
        "init": "random",
        "relaxation": "embeddings",
        "loss": "tag",
        "lr": 0.1,
        "lr_final": 1.0,
        "reg_weight": 0.0,
        "iterations": 2500,
        "discrete_every": 10**9,
        "prior_weight": 0.0,
        "polish_rounds": 0,
    },
    "LAMP": {
        "init": "random",
        "relaxation": "embeddings",
        "loss": "cosine",
        "lr": 0.01,
        "lr_final": 0.01,
        "reg_weight": 1.0,
        "iterations": 2000,
        "discrete_every": 75,
        "candidates": 200,
        "prior_weight": 0.2,
        "polish_rounds": 0,
    },
}

METRICS = (
    "rouge1",
    "rouge2",
    "rougeL",
    "bleu",
    "token_accuracy",
    "token_recall",
    "token_count_accuracy",
)


def _summary(values: list[float]) -> dict[str, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.mean(values), 4), "std": round(std, 4)}


def train(model: torch.nn.Module, dataset, steps: int, *, seed: int) -> float:
    """`steps` of plain SGD (batch 8, lr 0.3) on the training split; the test accuracy after."""
    order = torch_generator(seed, "bench-train")
    optimiser = torch.optim.SGD(model.parameters(), lr=0.3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(dataset.x_train.shape[0], (8,), generator=order)
        loss = torch.nn.functional.cross_entropy(model(dataset.x_train[idx]), dataset.y_train[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        predicted = model(dataset.x_test).argmax(dim=1)
    return float((predicted == dataset.y_test).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--trials", type=int, default=5, help="batches attacked per batch size")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--dataset", default="medquad", choices=["medquad", "mtsamples"])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ff", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=None, help="budget per attack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", action="store_true", help="include the decoded sentences")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a TextInversionParams field in every method (repeatable)",
    )
    parser.add_argument(
        "--train-steps", type=int, default=0, help="SGD steps (batch 8, lr 0.3) before the attack"
    )
    parser.add_argument(
        "--withhold-token-embedding",
        action="store_true",
        help="the client keeps the token embedding's gradient: no token set for the attack",
    )
    args = parser.parse_args()

    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.param)}
    dataset = load_dataset(args.dataset, data_dir())
    schema = dataset.info.text
    assert schema is not None
    arch = {"dim": args.dim, "heads": args.heads, "layers": args.layers, "ff": args.ff}
    model = build_model(
        "transformer", arch, dataset.info, generator=torch_generator(args.seed, "model")
    )
    accuracy = train(model, dataset, args.train_steps, seed=args.seed)
    public = (dataset.x_test, dataset.y_test)
    results = []
    for batch in args.batches:
        picks = torch_generator(args.seed, "bench-batches", batch)
        batches = [
            torch.randperm(dataset.x_train.shape[0], generator=picks)[:batch]
            for _ in range(args.trials)
        ]
        for method in args.methods:
            params = TextInversionParams(
                **{
                    **METHODS[method],
                    **overrides,
                    "max_seconds": args.max_seconds,
                    "max_sequences": batch,
                }
            )
            rows: list[dict[str, float]] = []
            seconds, exact, shown = [], [], []
            for trial, idx in enumerate(batches):
                x, y = dataset.x_train[idx], dataset.y_train[idx]
                obs = observe_batch(
                    model,
                    x,
                    y,
                    dataset.info,
                    knows=("architecture", "labels", "public_data"),
                    public_data=public,
                )
                if args.withhold_token_embedding:
                    key = token_embedding_key(model, schema)
                    assert key is not None
                    update = dataclasses.replace(obs.updates[0], withheld=frozenset({key}))
                    obs = dataclasses.replace(obs, updates=(update,))
                result = TextInversionAttack(params).run(
                    obs, model, rng=torch_generator(args.seed, "attack", trial)
                )
                truth = x.long()
                metrics, perm = score_texts(result.reconstruction.tokens, truth, schema)
                rows.append(metrics)
                seconds.append(result.seconds)
                exact.append(float(torch.equal(result.reconstruction.tokens[perm], truth)))
                if args.show:
                    shown.append(
                        [
                            {"truth": schema.decode(truth[i]), "reconstructed": schema.decode(r)}
                            for i, r in enumerate(result.reconstruction.tokens[perm])
                        ]
                    )
            entry: dict[str, object] = {
                "method": method,
                "batch": batch,
                "tokens": schema.max_length,
                "trials": len(rows),
                **{m: _summary([r[m] for r in rows]) for m in METRICS},
                "exact": round(statistics.mean(exact), 4),
                "seconds": _summary(seconds),
                "params": {
                    k: v
                    for k, v in params.model_dump().items()
                    if k in METHODS[method] or k in overrides
                },
            }
            if args.show:
                entry["sentences"] = shown
            results.append(entry)
    print(
        json.dumps(
            {
                "case": f"{args.dataset}-text-inversion",
                "model": {"kind": "transformer", **arch},
                "setting": "FedSGD gradient at initialisation; labels, architecture and the "
                "test split (public text for the prior) granted",
                "token_embedding": "withheld" if args.withhold_token_embedding else "sent",
                "train_steps": args.train_steps,
                "test_accuracy": round(accuracy, 4),
                "results": results,
                "machine": machine(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
