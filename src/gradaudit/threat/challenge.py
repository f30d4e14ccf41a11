"""The question an inference attack answers: the candidates it is shown and the private truth.

A membership attack is a game (Yeom et al. 2018; Carlini et al. 2022): the adversary is shown
records, some of which a client trained on, and scores each. The records it is shown are public
to it by the rules of the game; which of them are members is not, and stays here for scoring.

Each question has a builder, registered by name in :data:`CHALLENGES`; the runner builds one
challenge per question the scenario's attacks ask, so every attack on the same question is scored
on the same records.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
import torch
from pydantic import BaseModel

from gradaudit.attacks.attribute import (
    AttributeInferenceParams,
    answer_index,
    public_log_probs,
)
from gradaudit.attacks.property import PropertyInferenceParams, has_property, holds
from gradaudit.config import Scenario
from gradaudit.data import files
from gradaudit.data.base import Dataset
from gradaudit.federation import FederationResult
from gradaudit.registry import Registry

logger = logging.getLogger(__name__)

P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class ChallengeInputs:
    """PRIVATE: what a challenge builder may read (the scenario's data and the finished run).

    Attributes:
        scenario: the scenario.
        dataset: the dataset, private training split included.
        clients: per client, its indices into the training split.
        federation: the finished federation (its captured rounds hold the local plans).
        rng: the challenge's random stream.
    """

    scenario: Scenario
    dataset: Dataset
    clients: Sequence[np.ndarray]
    federation: FederationResult
    rng: np.random.Generator


@dataclass(frozen=True)
class Challenge:
    """One inference question, ready to be asked and scored.

    Attributes:
        question: ``membership``, ``source``, ``attribute`` or ``property``.
        kind: ``binary`` (scores (N,), truth bool: higher should mean True) or ``choice``
            (scores (N, K), truth an answer index in [0, K)).
        public: what the adversary is shown, put into ``side_info["candidates"]``; at least
            ``x`` and ``y`` (tensors in model space) for questions about records.
        truth: PRIVATE: the answer per candidate.
        record_ids: a stable name per candidate for the per-record scores file (e.g.
            ``train:17``, ``test:3``).
        baseline: for ``choice``: the answer a predictor that never saw the model gives per
            candidate (the report states the attack's gain over it); None when chance is the
            baseline.
        held_out: indices into the test split the challenge uses as non-members; the runner
            withholds them from the adversary's public data.
        notes: sentences for the report (e.g. too few non-members for a false-positive rate).
    """

    question: str
    kind: Literal["binary", "choice"]
    public: Mapping[str, object]
    truth: np.ndarray
    record_ids: tuple[str, ...]
    baseline: np.ndarray | None = None
    held_out: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.record_ids) != len(self.truth):
            raise ValueError(f"{len(self.record_ids)} record ids for {len(self.truth)} candidates")


ChallengeBuilder = Callable[[ChallengeInputs], Challenge]

CHALLENGES: Registry[ChallengeBuilder] = Registry("inference question")
"""Every inference question, by name, with the builder of its challenge."""


@CHALLENGES.register(
    "membership",
    summary="the target client's training records mixed with as many held-out records; "
    "was each one trained on?",
)
def membership_challenge(inputs: ChallengeInputs) -> Challenge:
    """Members: the target client's records; non-members: records of the held-out test split.

    ``threat.candidates.members`` caps the members (a random subset), and
    ``threat.candidates.non_members`` sets the non-members (default: as many as members). The
    candidates are shuffled so their order says nothing.
    """
    spec = inputs.scenario.threat.candidates
    target = inputs.scenario.threat.target.client
    rng = inputs.rng
    owned = np.asarray(inputs.clients[target], dtype=np.int64)
    if owned.size == 0:
        raise ValueError(f"client {target} holds no records: there are no members to test")
    members = owned
    if spec.members is not None and spec.members < owned.size:
        members = np.sort(rng.choice(owned, size=spec.members, replace=False))
    wanted = spec.non_members if spec.non_members is not None else members.size
    available = len(inputs.dataset.y_test)
    notes: list[str] = []
    if wanted > available:
        notes.append(
            f"only {available} held-out records exist, fewer than the {wanted} non-members asked "
            "for; all of them are used"
        )
        wanted = available
    held_out = np.sort(rng.choice(available, size=wanted, replace=False)).astype(np.int64)
    data = inputs.dataset
    x = torch.cat([data.x_train[torch.as_tensor(members)], data.x_test[torch.as_tensor(held_out)]])
    y = torch.cat([data.y_train[torch.as_tensor(members)], data.y_test[torch.as_tensor(held_out)]])
    truth = np.concatenate([np.ones(members.size, bool), np.zeros(held_out.size, bool)])
    ids = [f"train:{i}" for i in members] + [f"test:{j}" for j in held_out]
    order = rng.permutation(truth.size)
    index = torch.as_tensor(order)
    return Challenge(
        question="membership",
        kind="binary",
        public={"x": x[index].clone(), "y": y[index].clone()},
        truth=truth[order],
        record_ids=tuple(ids[i] for i in order),
        held_out=held_out,
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- source inference

SOURCE_PER_CLIENT = 50
"""Records drawn from each client for the source question when ``threat.candidates.members``
is not set."""


@CHALLENGES.register(
    "source",
    summary="records drawn from every client's training data; which client holds each?",
)
def source_challenge(inputs: ChallengeInputs) -> Challenge:
    """Candidates: up to ``threat.candidates.members`` (default :data:`SOURCE_PER_CLIENT`)
    records of every client's training data, drawn at random and shuffled; the answer is the
    owner's client id (Hu et al., "Source Inference Attacks in Federated Learning", ICDM 2021).

    ``public`` holds ``x``, ``y`` and ``num_clients``. The baseline is the prior: every record
    is given to the client that holds the most training records (the server learns the counts
    from the updates' example counts).
    """
    spec = inputs.scenario.threat.candidates
    per_client = spec.members if spec.members is not None else SOURCE_PER_CLIENT
    rng = inputs.rng
    chosen, owners = [], []
    for client, owned in enumerate(inputs.clients):
        owned = np.asarray(owned, dtype=np.int64)
        take = min(per_client, owned.size)
        if take:
            chosen.append(np.sort(rng.choice(owned, size=take, replace=False)))
            owners.append(np.full(take, client, dtype=np.int64))
    if not chosen:
        raise ValueError("no client holds any record: there is nothing to attribute")
    records = np.concatenate(chosen)
    truth = np.concatenate(owners)
    order = rng.permutation(truth.size)
    records, truth = records[order], truth[order]
    index = torch.as_tensor(records)
    sizes = np.array([len(c) for c in inputs.clients])
    notes = []
    if any(len(c) < per_client for c in inputs.clients):
        notes.append(
            f"some clients hold fewer than {per_client} records; all of theirs are candidates"
        )
    return Challenge(
        question="source",
        kind="choice",
        public={
            "x": inputs.dataset.x_train[index].clone(),
            "y": inputs.dataset.y_train[index].clone(),
            "num_clients": len(inputs.clients),
        },
        truth=truth,
        record_ids=tuple(f"train:{i}" for i in records),
        baseline=np.full(truth.size, int(np.argmax(sizes)), dtype=np.int64),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- column units


def to_model_units(
    inputs: ChallengeInputs, column: str, values: Sequence[float], units: str
) -> np.ndarray:
    """`values` of a numeric column in model space (``units`` ``raw`` or ``model``)."""
    edges = np.asarray(values, dtype=np.float64)
    if units == "model":
        return edges
    schema = inputs.dataset.info.tabular
    if schema is None:
        raise ValueError(f"{inputs.dataset.info.dataset} is not tabular: {column!r} has no units")
    mean, std = schema.raw_scale(column)
    return (edges - mean) / std


def first_attack_params(scenario: Scenario, kind: str, params_model: type[P]) -> P:
    """The validated params of the scenario's first attack of `kind` (defaults when none).

    A challenge is built once per question, so the first entry that asks it defines it.
    """
    for spec in scenario.attacks:
        if spec.kind == kind:
            return params_model.model_validate(spec.params)
    return params_model()


# --------------------------------------------------------------------------- attribute inference


def _used_by(inputs: ChallengeInputs, client: int) -> np.ndarray:
    """The client's records it trained on in any captured round, else all of its records."""
    used = [
        capture.plans[client].used
        for capture in inputs.federation.captures.values()
        if client in capture.plans
    ]
    used = [u for u in used if u.size]
    if used:
        return np.unique(np.concatenate(used)).astype(np.int64)
    return np.sort(np.asarray(inputs.clients[client], dtype=np.int64))


def attribute_baseline(
    dataset: Dataset, question: Mapping[str, object], x: torch.Tensor, y: torch.Tensor
) -> np.ndarray:
    """The answers of the best predictor that never saw the model: a logistic regression fitted
    on the public held-out split, predicting the attribute from the other columns and the label
    (``attacks.attribute.public_log_probs``).

    An attribute that the other features predict proves nothing about the model; the report
    gives the attack's gain over this.
    """
    assert dataset.info.tabular is not None
    log_probs = public_log_probs(
        dataset.x_test,
        dataset.y_test,
        x,
        y,
        question,
        dataset.info.tabular,
        dataset.info.num_classes,
        with_label=True,
    )
    return log_probs.argmax(axis=1).astype(np.int64)


@CHALLENGES.register(
    "attribute",
    summary="the target client's records with one sensitive column hidden; which value does "
    "each hold?",
)
def attribute_challenge(inputs: ChallengeInputs) -> Challenge:
    """Candidates: the target client's training records (those it used in the captured rounds,
    capped at ``threat.candidates.members``), with one column hidden.

    The column is the first ``attribute_inference`` attack's ``attribute`` (default ``sex``).
    A categorical column is hidden as code 0 and the answers are its codes, the missing code
    ``?`` left out (records holding it are dropped, with a note). A numeric column is hidden as
    0 (the train mean) and the answers are its bands (``bands`` edges; a record at an edge
    belongs to the upper band); ``public["values"]`` then holds, per band, the median of the
    public held-out split within it (model space) for the attacker to fill in, or the band's
    midpoint (edge ± one standard deviation for an open band) where the public split has none.

    ``public`` holds ``x`` (column hidden), ``y``, ``column`` (its index), ``name``,
    ``answers`` (a name per answer), ``values`` (the model-space value of each answer), and for
    numeric columns ``edges`` (as given) and ``edges_model``. The baseline is
    :func:`attribute_baseline`.
    """
    params = first_attack_params(inputs.scenario, "attribute_inference", AttributeInferenceParams)
    schema = inputs.dataset.info.tabular
    if schema is None:
        raise ValueError(
            f"attribute inference hides a column of a tabular dataset; "
            f"{inputs.dataset.info.dataset} is {inputs.dataset.info.modality}"
        )
    names = (*schema.numeric, *schema.categorical)
    if params.attribute not in names:
        raise ValueError(
            f"attribute {params.attribute!r} is not a column of {inputs.dataset.info.dataset}; "
            f"columns: {', '.join(names)}"
        )
    column = names.index(params.attribute)
    numeric = column < len(schema.numeric)
    public: dict[str, object] = {"column": column, "name": params.attribute}
    if numeric:
        if params.bands is None:
            raise ValueError(
                f"attribute {params.attribute!r} is numeric: give its band edges (bands)"
            )
        edges = to_model_units(inputs, params.attribute, params.bands, params.units)
        public["edges_model"] = edges.tolist()
        fills = _band_fills(inputs.dataset.x_test[:, column].numpy(), edges, public)
        unit = "" if params.units == "raw" else " (model units)"
        bounds = [f"{e:g}" for e in params.bands]
        answers = (
            [f"< {bounds[0]}{unit}"]
            + [f"{a} to < {b}{unit}" for a, b in itertools.pairwise(bounds)]
            + [f">= {bounds[-1]}{unit}"]
        )
        neutral = 0.0
        public["edges"] = list(params.bands)
    else:
        if params.bands is not None:
            raise ValueError(f"attribute {params.attribute!r} is categorical: it takes no bands")
        j = column - len(schema.numeric)
        categories = schema.categories[j] if schema.categories else ()
        codes = [
            c
            for c in range(schema.cardinalities[j])
            if not (c < len(categories) and categories[c] == files.MISSING)
        ]
        fills = np.asarray(codes, dtype=np.float64)
        answers = [categories[c] if c < len(categories) else str(c) for c in codes]
        neutral = float(codes[0])
    target = inputs.scenario.threat.target.client
    records = _used_by(inputs, target)
    public["values"] = [float(v) for v in fills]
    truth_all = answer_index(inputs.dataset.x_train[torch.as_tensor(records), column], public)
    notes = []
    valid = truth_all >= 0
    if not valid.all():
        notes.append(
            f"{int((~valid).sum())} of client {target}'s records have {params.attribute} "
            "missing; they are not candidates"
        )
    records = records[valid]
    if records.size == 0:
        raise ValueError(f"client {target} holds no record with a known {params.attribute}")
    cap = inputs.scenario.threat.candidates.members
    rng = inputs.rng
    if cap is not None and cap < records.size:
        records = np.sort(rng.choice(records, size=cap, replace=False))
    records = records[rng.permutation(records.size)]
    index = torch.as_tensor(records)
    x_true = inputs.dataset.x_train[index].clone()
    y = inputs.dataset.y_train[index].clone()
    truth = answer_index(x_true[:, column], public)
    baseline = attribute_baseline(inputs.dataset, public, x_true, y)
    hidden = x_true.clone()
    hidden[:, column] = neutral
    public.update(x=hidden, y=y, answers=answers, hidden_as=neutral)
    return Challenge(
        question="attribute",
        kind="choice",
        public=public,
        truth=truth,
        record_ids=tuple(f"train:{i}" for i in records),
        baseline=baseline,
        notes=tuple(notes),
    )


def _band_fills(
    public_values: np.ndarray, edges: np.ndarray, question: Mapping[str, object]
) -> np.ndarray:
    """Per band, the median public value inside it, else its midpoint (edge ± 1 for open bands:
    one standard deviation in model units)."""
    bands = answer_index(public_values, question)
    bounds = np.concatenate([[edges[0] - 2.0], edges, [edges[-1] + 2.0]])
    fills = []
    for band in range(len(edges) + 1):
        inside = public_values[bands == band]
        fills.append(
            float(np.median(inside)) if inside.size else (bounds[band] + bounds[band + 1]) / 2
        )
    return np.asarray(fills, dtype=np.float64)


# --------------------------------------------------------------------------- property inference


@CHALLENGES.register(
    "property",
    summary="every observed (round, client) update; does the data behind it have the property "
    "(e.g. a majority of patients over 60)?",
)
def property_challenge(inputs: ChallengeInputs) -> Challenge:
    """Candidates: every individual update of the captured rounds, as (round, client) pairs.

    The property comes from the first ``property_inference`` attack's params (Melis et al.,
    IEEE S&P 2019): a record has it when its numeric ``column`` is above ``above`` (converted
    to model units, see :func:`to_model_units`) or, for ``label``, when its label is
    ``label``; an update has it when at least ``min_share`` of the records behind it (the
    client's private local plan of that round) do.

    ``public`` holds ``updates`` (the pairs, in order), ``column`` (index, or None), ``name``,
    ``cut`` (model space, or None), ``label`` (or None), ``min_share`` and ``property`` (the
    definition in words). Updates computed from no example are left out.
    """
    params = first_attack_params(inputs.scenario, "property_inference", PropertyInferenceParams)
    info = inputs.dataset.info
    numeric = info.tabular.numeric if info.tabular is not None else ()
    kind = params.property
    if kind == "auto":
        kind = "column" if params.column in numeric else "label"
    definition: dict[str, object] = {"column": None, "name": None, "cut": None, "label": None}
    if kind == "column":
        if params.column not in numeric:
            raise ValueError(
                f"property column {params.column!r} is not a numeric column of {info.dataset}"
                + (f"; numeric: {', '.join(numeric)}" if numeric else "")
            )
        (cut,) = to_model_units(inputs, params.column, [params.above], params.units)
        unit = "" if params.units == "raw" else " (model units)"
        definition.update(column=numeric.index(params.column), name=params.column, cut=float(cut))
        words = f"{params.column} > {params.above:g}{unit}"
    else:
        if params.label >= info.num_classes:
            raise ValueError(f"property label {params.label} >= {info.num_classes} classes")
        definition.update(label=params.label)
        words = f"label {info.class_names[params.label]}"
    x, y = inputs.dataset.x_train, inputs.dataset.y_train
    record_has = has_property(definition, x, y)
    pairs, truth = [], []
    for rnd in sorted(inputs.federation.captures):
        capture = inputs.federation.captures[rnd]
        for update in capture.updates:
            plan = capture.plans.get(update.client_id)
            if plan is None or plan.num_examples == 0 or update.num_examples == 0:
                continue
            pairs.append((rnd, update.client_id))
            truth.append(holds(float(record_has[plan.used].mean()), params.min_share))
    if not pairs:
        raise ValueError("no individual update was captured: there is nothing to classify")
    truth_array = np.asarray(truth, dtype=bool)
    notes = []
    if truth_array.all() or not truth_array.any():
        notes.append(
            f"the property ({words}, share >= {params.min_share:g}) "
            + ("holds for every" if truth_array.any() else "holds for no")
            + " observed update: AUC and low-FPR rates are undefined"
        )
    return Challenge(
        question="property",
        kind="binary",
        public={
            **definition,
            "updates": pairs,
            "min_share": params.min_share,
            "property": f"a share >= {params.min_share:g} of the records behind the update "
            f"have {words}",
        },
        truth=truth_array,
        record_ids=tuple(f"round:{r}/client:{c}" for r, c in pairs),
        notes=tuple(notes),
    )


def public_records(dataset: Dataset, challenges: Sequence[Challenge]) -> tuple[torch.Tensor, ...]:
    """The held-out split without the records any challenge uses as non-members.

    Public data is, by definition, data no client trained on; a non-member candidate inside it
    would tell the adversary the answer.
    """
    withheld = np.unique(np.concatenate([c.held_out for c in challenges] or [np.zeros(0)]))
    keep = np.setdiff1d(np.arange(len(dataset.y_test)), withheld.astype(np.int64))
    index = torch.as_tensor(keep, dtype=torch.long)
    return dataset.x_test[index], dataset.y_test[index]


__all__ = [
    "CHALLENGES",
    "SOURCE_PER_CLIENT",
    "Challenge",
    "ChallengeBuilder",
    "ChallengeInputs",
    "attribute_baseline",
    "attribute_challenge",
    "first_attack_params",
    "membership_challenge",
    "property_challenge",
    "public_records",
    "source_challenge",
    "to_model_units",
]
