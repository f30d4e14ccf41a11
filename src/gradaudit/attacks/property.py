"""Property inference: does the data behind an update have a property (Melis et al. 2019)?

Melis, Song, De Cristofaro and Shmatikov, "Exploiting Unintended Feature Leakage in
Collaborative Learning", IEEE S&P 2019: a participant (here the server) that holds auxiliary
data labelled with a property computes updates of the current global model on auxiliary batches
with and without the property, trains a binary classifier on those updates, and applies it to
the updates it observes. The property need not be the learning task (Melis et al. infer, e.g.,
the race of faces behind a gender classifier's updates).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from gradaudit.attacks.base import Infers, ProgressFn, Question
from gradaudit.attacks.signals import rounds_of
from gradaudit.federation.local import (
    LocalPlan,
    has_batchnorm,
    plan_local_batches,
    train_clients_loop,
    train_clients_vectorised,
)
from gradaudit.models import classifier_keys
from gradaudit.types import ClientUpdate, Observation, TensorDict

CUT_TOLERANCE = 1e-5
"""Model-space slack at a column's cut: a standardised integer (an age of exactly 60) stored as
float32 lands within ~1e-7 of the cut computed in float64 and must not count as above it."""

NEUTRAL_SCORE = 0.5
"""The score of a listed update the adversary did not see (no evidence either way)."""


class PropertyInferenceParams(BaseModel):
    """Parameters of ``property_inference``.

    The first ``property_inference`` entry of a scenario also defines the question
    (``threat.challenge``'s ``property`` builder reads `property`, `column`, `above`, `units`,
    `label` and `min_share`), so every property attack of the scenario is scored alike.

    Attributes:
        property: ``column``: the share of records whose numeric `column` is above `above`;
            ``label``: the share of records with label `label`; ``auto``: ``column`` when the
            dataset has the numeric column `column` (``age`` by default: patients over 60 in
            heart_disease), else ``label``.
        column: the numeric column of the ``column`` property.
        above: the cut; a record holds the property when its value is strictly above it.
        units: ``raw`` (the dataset's original units, e.g. years) or ``model`` (standardised).
        label: the class of the ``label`` property.
        min_share: the property holds for an update when at least this share of the records
            behind it have it (a small value asks "does the batch contain any").
        aux_updates: updates the adversary simulates per round on auxiliary data, half with
            and half without the property.
        features: which tensors of an update the classifier reads: ``first`` (the input layer
            and every embedding, where Melis et al. read their features), ``last`` (the
            classifier head) or ``all``.
        classifier: ``logistic`` (L2 logistic regression) or ``random_forest``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    property: Literal["auto", "column", "label"] = "auto"
    column: str = "age"
    above: float = 60.0
    units: Literal["raw", "model"] = "raw"
    label: int = Field(1, ge=0)
    min_share: float = Field(0.5, gt=0, le=1)
    aux_updates: int = Field(64, ge=4)
    features: Literal["all", "first", "last"] = "all"
    classifier: Literal["logistic", "random_forest"] = "logistic"


def has_property(definition: Mapping[str, object], x: Tensor, y: Tensor) -> np.ndarray:
    """Which records hold the property the challenge defines (``column``/``cut`` or ``label``).

    Example:
        >>> d = {"column": 0, "cut": 0.5, "label": None}
        >>> has_property(d, torch.tensor([[0.2], [0.5], [0.9]]), torch.zeros(3)).tolist()
        [False, False, True]
    """
    if definition.get("column") is not None:
        values = x[:, int(definition["column"])].double().numpy()  # type: ignore[arg-type]
        return values > float(definition["cut"]) + CUT_TOLERANCE  # type: ignore[arg-type]
    return (y.numpy() == int(definition["label"])).astype(bool)  # type: ignore[arg-type]


def holds(share: float, min_share: float) -> bool:
    """Whether a share of records with the property meets the threshold."""
    return share >= min_share - 1e-12


def property_question(obs: Observation) -> Mapping[str, object] | None:
    """The challenge's definition of the property and its list of updates, when complete."""
    entry = obs.side_info.get("candidates")
    if not isinstance(entry, Mapping) or not {"updates", "min_share"} <= set(entry):
        return None
    return entry


def feature_keys(model: nn.Module, update: ClientUpdate, which: str) -> list[str]:
    """The parameter keys the classifier reads (sent, floating point), in model order."""
    names = [n for n, p in model.named_parameters() if p.is_floating_point()]
    sent = set(update.sent_keys)
    if which == "last":
        wanted = {k for k in classifier_keys(model) if k is not None}
    elif which == "first":
        wanted = set()
        for prefix, module in model.named_modules():
            if isinstance(module, nn.Embedding):
                wanted |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
        for prefix, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                wanted |= {f"{prefix}.{n}" for n, _ in module.named_parameters()}
                break
    else:
        wanted = set(names)
    keys = [n for n in names if n in wanted and n in sent]
    return keys or [n for n in names if n in sent]


def update_features(tensors: TensorDict, keys: Sequence[str], sign: float) -> np.ndarray:
    """One update as a unit-length float64 vector over `keys` (``sign`` -1 turns a FedAvg
    change into a gradient direction): the direction carries the property, the norm mostly
    the step count and the loss level."""
    flat = torch.cat([tensors[k].flatten().double() for k in keys]) * sign
    norm = flat.norm()
    return (flat / norm if norm > 0 else flat).numpy()


def aux_batches(
    positive: np.ndarray,
    negative: np.ndarray,
    sizes: Sequence[int],
    count: int,
    min_share: float,
    rng: np.random.Generator,
) -> list[tuple[np.ndarray, bool]]:
    """`count` auxiliary datasets, alternately with and without the property.

    Each takes its size from `sizes` in turn (the sizes of the observed updates) and a share of
    property records drawn uniformly within its class's range (``[min_share, 1]`` or
    ``[0, min_share)``), sampled from the public pools with replacement only where a pool is
    smaller than needed.

    Example:
        >>> out = aux_batches(np.arange(10), np.arange(10, 20), [4], 2, 0.5,
        ...                   np.random.default_rng(0))
        >>> [(len(i), bool((i < 10).mean() >= 0.5), flag) for i, flag in out]
        [(4, True, True), (4, False, False)]
    """
    out = []
    for i in range(count):
        n = int(sizes[i % len(sizes)])
        want = i % 2 == 0
        lowest = max(1, math.ceil(min_share * n - 1e-9))
        k = int(rng.integers(lowest, n + 1)) if want else int(rng.integers(0, min(lowest, n)))
        parts = [
            rng.choice(positive, size=k, replace=k > positive.size) if k else np.zeros(0),
            rng.choice(negative, size=n - k, replace=n - k > negative.size)
            if n - k
            else np.zeros(0),
        ]
        out.append((rng.permutation(np.concatenate(parts).astype(np.int64)), want))
    return out


class PropertyInferenceAttack(Infers):
    """Infer a property of the data behind each observed update from auxiliary updates.

    Melis et al. (IEEE S&P 2019)'s passive property inference: in every round the adversary
    replays local training (the granted local hyperparameters: algorithm, learning rate, batch
    size, epochs or steps) from that round's global model on auxiliary datasets built from the
    granted public data, half of them with the property and half without, sized like the
    observed updates; it fits a classifier (logistic regression or random forest) on the
    unit-normalised update tensors it selects and scores each observed update of that round
    with the predicted probability of the property.

    Threat model: an honest-but-curious server that sees individual updates, knows the
    architecture and the local hyperparameters, and holds public labelled data of the task.
    Client-side defenses are not replayed (the adversary simulates plain clients).
    """

    name: ClassVar[str] = "property_inference"
    question: ClassVar[Question | None] = "property"
    needs_history: ClassVar[bool] = True

    def __init__(self, params: PropertyInferenceParams | None = None) -> None:
        self.params = params or PropertyInferenceParams()

    def applicable(self, obs: Observation) -> str | None:
        """None when the question, the architecture, the public data, the local
        hyperparameters and some individual update are at hand."""
        question = property_question(obs)
        if question is None:
            return "no property question was given (side_info['candidates'] with updates)"
        if not obs.side_info.get("architecture"):
            return "the adversary does not know the model architecture"
        public = obs.side_info.get("public_data")
        if not isinstance(public, Mapping) or "x" not in public:
            return (
                "property inference simulates updates on auxiliary data: grant public_data "
                "(threat.knows)"
            )
        hyper = obs.side_info.get("local_hyperparameters")
        if not isinstance(hyper, Mapping) or not hyper.get("lr"):
            return (
                "replaying the clients' local training needs the local hyperparameters "
                "(grant local_hyperparameters)"
            )
        rounds = rounds_of(obs)
        if not any(u.client_id >= 0 for r in rounds for u in r.updates):
            return (
                "property inference classifies individual updates; the server sees only the "
                "aggregate"
            )
        mask = has_property(question, public["x"], public["y"])  # type: ignore[arg-type]
        if mask.all() or not mask.any():
            return (
                "the public data holds records only "
                + ("with" if mask.any() else "without")
                + " the property: no auxiliary batches of the other kind can be built"
            )
        return None

    def infer(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None,
    ) -> tuple[Tensor, dict[str, object]]:
        """Score every listed (round, client) update with a per-round property classifier."""
        question = property_question(obs)
        assert question is not None
        listed = [(int(r), int(c)) for r, c in question["updates"]]  # type: ignore[union-attr]
        public = obs.side_info["public_data"]
        x_pub, y_pub = public["x"], public["y"]  # type: ignore[index]
        mask = has_property(question, x_pub, y_pub)
        positive, negative = np.flatnonzero(mask), np.flatnonzero(~mask)
        hyper = obs.side_info["local_hyperparameters"]
        replica = copy.deepcopy(model)  # local training loads states into it
        seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        np_rng = np.random.default_rng(seed)
        scores = np.full(len(listed), NEUTRAL_SCORE, dtype=np.float64)
        position = {pair: i for i, pair in enumerate(listed)}
        rounds = [
            r for r in rounds_of(obs) if any((r.round, u.client_id) in position for u in r.updates)
        ]
        fit_accuracy: list[float] = []
        scored: set[tuple[int, int]] = set()
        for done, view in enumerate(rounds, start=1):
            observed = [u for u in view.updates if (view.round, u.client_id) in position]
            batches = aux_batches(
                positive,
                negative,
                [u.num_examples for u in observed],
                self.params.aux_updates,
                float(question["min_share"]),  # type: ignore[arg-type]
                np_rng,
            )
            simulated = self._simulate(replica, view, x_pub, y_pub, batches, hyper, np_rng)
            keys = feature_keys(model, observed[0], self.params.features)
            sign = -1.0 if observed[0].kind == "delta" else 1.0
            train = np.stack([update_features(t, keys, sign) for t in simulated])
            labels = np.array([flag for _, flag in batches])
            classifier = self._classifier(seed + view.round).fit(train, labels)
            fit_accuracy.append(float(classifier.score(train, labels)))
            test = np.stack([update_features(u.tensors, keys, sign) for u in observed])
            probs = classifier.predict_proba(test)[:, list(classifier.classes_).index(True)]
            for update, p in zip(observed, probs, strict=True):
                scores[position[(view.round, update.client_id)]] = float(p)
                scored.add((view.round, update.client_id))
            if progress is not None:
                progress(done, len(rounds))
        return torch.as_tensor(scores, dtype=torch.float64), {
            "method": "Melis et al. 2019: a per-round classifier on updates simulated from "
            "public data with and without the property",
            "property": question.get("property"),
            "classifier": self.params.classifier,
            "features": self.params.features,
            "aux_updates_per_round": self.params.aux_updates,
            "public_with_property": int(positive.size),
            "public_without_property": int(negative.size),
            "rounds": [r.round for r in rounds],
            "training_accuracy": fit_accuracy,
            "updates_not_seen": len(listed) - len(scored),
        }

    def _classifier(self, seed: int) -> LogisticRegression | RandomForestClassifier:
        if self.params.classifier == "random_forest":
            return RandomForestClassifier(n_estimators=200, random_state=seed % 2**32)
        return LogisticRegression(max_iter=2000)

    @staticmethod
    def _simulate(
        model: nn.Module,
        view: Observation,
        x: Tensor,
        y: Tensor,
        batches: list[tuple[np.ndarray, bool]],
        hyper: Mapping[str, object],
        rng: np.random.Generator,
    ) -> list[TensorDict]:
        """The updates plain clients holding each auxiliary dataset would send in this round."""
        algorithm = hyper.get("algorithm") or (
            "fedsgd" if view.updates[0].kind == "gradient" else "fedavg"
        )
        plans: list[LocalPlan] = [
            plan_local_batches(
                i,
                indices,
                algorithm=algorithm,  # type: ignore[arg-type]
                batch_size=int(hyper.get("batch_size") or len(indices)),  # type: ignore[arg-type]
                epochs=hyper.get("epochs"),  # type: ignore[arg-type]
                steps=hyper.get("steps"),  # type: ignore[arg-type]
                rng=rng,
            )
            for i, (indices, _) in enumerate(batches)
        ]
        train = train_clients_loop if has_batchnorm(model) else train_clients_vectorised
        return train(
            model,
            view.global_params,
            x,
            y,
            plans,
            algorithm=algorithm,  # type: ignore[arg-type]
            lr=float(hyper["lr"]),  # type: ignore[arg-type]
            batchnorm=str(hyper.get("batchnorm") or "train"),
        )
