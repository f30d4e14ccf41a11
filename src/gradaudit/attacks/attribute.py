"""Attribute inference: a hidden sensitive column of the target client's records, from its updates.

Fredrikson, Jha and Ristenpart, "Model Inversion Attacks that Exploit Confidence Information and
Basic Countermeasures", ACM CCS 2015 (and Fredrikson et al., USENIX Security 2014): an adversary
that knows a training record except its sensitive attribute tries every value of the attribute
and keeps the one under which the model fits the record best. Here the model is what the server
holds of the target client: its local model in every round it took part in (the global model
plus the client's update), so the attack reads the client's own training, not only what the
global model learnt from everyone.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.linear_model import LogisticRegression
from torch import Tensor, nn

from gradaudit.attacks.base import Infers, ProgressFn, Question
from gradaudit.attacks.signals import (
    candidates,
    local_lr,
    local_state,
    record_losses,
    rounds_of,
)
from gradaudit.attacks.source import loss_change
from gradaudit.types import (
    ClientUpdate,
    Observation,
    TabularSchema,
)

AttributeSignal = Literal["auto", "loss_drop", "loss", "gradient_alignment"]


class AttributeInferenceParams(BaseModel):
    """Parameters of ``attribute_inference``.

    The first ``attribute_inference`` entry of a scenario also defines the question
    (``threat.challenge``'s ``attribute`` builder reads `attribute`, `bands` and `units`), so
    every attribute attack of the scenario is scored on the same hidden column.

    Attributes:
        attribute: the hidden column's name in the dataset's tabular schema (e.g. ``sex``;
            ``age`` with `bands`).
        bands: for a numeric column, the band edges, ascending: ``[50, 60]`` asks for
            ``< 50``, ``50 to < 60`` or ``>= 60``. Required for numeric columns, refused for
            categorical ones (their answers are the category codes).
        units: ``raw``: the edges are in the dataset's original units (years), converted with
            the train split's standardisation the loader recorded
            (``TabularSchema.raw_scale``); ``model``: the edges are standardised values as stored.
        signal: ``loss``: the completed record's log-likelihood ``-loss`` under the target's
            local model (global model + its update), averaged over the rounds it took part in:
            Fredrikson et al.'s rule on the client's model; ``loss_drop``: the loss under the
            round's global model minus under the local model, summed over rounds (the client's
            own training only; it favours implausible completions, whose loss has more room to
            fall, so on heart_disease it stayed below the no-model baseline);
            ``gradient_alignment``: the first-order drop, for FedSGD gradients without the
            granted learning rate; ``auto``: ``loss`` where the local model can be rebuilt,
            else ``gradient_alignment``.
        prior: ``public``: add log p(value | the other columns), a logistic regression fitted
            on the granted public data (with the label too for the drop signals), so that for
            ``loss`` the score is Bayes' posterior; ``none``: the model's evidence alone;
            ``auto``: ``public`` for ``loss`` when public data is granted, else ``none`` (the
            drop signals have no natural scale against a log-probability: weigh them with
            `temperature` and ask for ``public`` explicitly).
        temperature: divides the model's evidence before the prior is added and the softmax
            taken (1 keeps ``loss`` a log-likelihood).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    attribute: str = "sex"
    bands: tuple[float, ...] | None = None
    units: Literal["raw", "model"] = "raw"
    signal: AttributeSignal = "auto"
    prior: Literal["auto", "none", "public"] = "auto"
    temperature: float = Field(1.0, gt=0)

    @field_validator("bands")
    @classmethod
    def _ascending(cls, bands: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if bands is not None and (not bands or any(b <= a for a, b in itertools.pairwise(bands))):
            raise ValueError("bands must be one or more strictly ascending edges")
        return bands


def question_of(obs: Observation) -> Mapping[str, object] | None:
    """The challenge's description of the hidden column, when complete."""
    entry = obs.side_info.get("candidates")
    if not isinstance(entry, Mapping) or not {"x", "y", "column", "values"} <= set(entry):
        return None
    return entry


def filled_rows(x: Tensor, column: int, values: Tensor) -> Tensor:
    """Every candidate with every value in the hidden column: (N * V, D), value index fastest.

    Example:
        >>> filled_rows(torch.zeros(2, 2), 1, torch.tensor([3.0, 4.0]))[:, 1].tolist()
        [3.0, 4.0, 3.0, 4.0]
    """
    rows = x.repeat_interleave(len(values), dim=0).clone()
    rows[:, column] = values.to(rows.dtype).repeat(len(x))
    return rows


EDGE_TOLERANCE = 1e-5
"""Model-space slack at band edges: a standardised integer (an age of exactly 60) stored as
float32 lands within ~1e-7 of the edge computed in float64 and must count as at the edge."""

SMOOTHING = 1e-3
"""Probability mass spread evenly over the answers by :func:`public_log_probs`, so an answer
the public data never shows keeps a finite log-probability."""


def answer_index(values: Tensor | np.ndarray, question: Mapping[str, object]) -> np.ndarray:
    """Each column value's answer index: its band when the question has ``edges_model`` (a
    value at an edge belongs to the upper band), else the position of its code in
    ``values``; -1 for a code that is not an answer.

    Example:
        >>> answer_index(np.array([1.0, 0.0, 2.0]), {"values": [0.0, 1.0]}).tolist()
        [1, 0, -1]
        >>> answer_index(np.array([-1.0, 0.5, 3.0]), {"edges_model": [0.5]}).tolist()
        [0, 1, 1]
    """
    values = np.asarray(values, dtype=np.float64)
    if question.get("edges_model") is not None:
        edges = np.asarray(question["edges_model"], dtype=np.float64) - EDGE_TOLERANCE
        return np.searchsorted(edges, values, side="right").astype(np.int64)
    codes = np.asarray(question["values"], dtype=np.float64)
    match = np.abs(values[:, None] - codes[None, :]) < 0.5
    return np.where(match.any(axis=1), match.argmax(axis=1), -1).astype(np.int64)


def predictor_features(
    x: np.ndarray,
    y: np.ndarray,
    column: int,
    schema: TabularSchema,
    num_classes: int,
    *,
    with_label: bool,
) -> np.ndarray:
    """The inputs of a no-model attribute predictor: every column but `column` (numeric as
    they are, categorical one-hot) and, `with_label`, the label one-hot."""
    num_numeric = len(schema.numeric)
    parts = []
    for j in range(schema.num_features):
        if j == column:
            continue
        if j < num_numeric:
            parts.append(x[:, j : j + 1])
        else:
            card = schema.cardinalities[j - num_numeric]
            parts.append(np.eye(card)[np.clip(x[:, j].astype(np.int64), 0, card - 1)])
    if with_label:
        parts.append(np.eye(num_classes)[y])
    return np.hstack(parts) if parts else np.zeros((len(x), 0))


def public_log_probs(
    x_public: Tensor,
    y_public: Tensor,
    x: Tensor,
    y: Tensor,
    question: Mapping[str, object],
    schema: TabularSchema,
    num_classes: int,
    *,
    with_label: bool,
) -> np.ndarray:
    """log p(answer | the other columns [, the label]) for each row of `x`, (N, V) float64.

    A logistic regression fitted on public records (whose hidden column is known), smoothed by
    :data:`SMOOTHING`; a single public answer gives that answer (smoothed), none gives uniform.
    The challenge's baseline is its argmax with the label; the attack's prior, without it.
    """
    column = int(question["column"])  # type: ignore[arg-type]
    num_answers = len(question["values"])  # type: ignore[arg-type]
    x_pub = x_public.double().numpy()
    target = answer_index(x_pub[:, column], question)
    keep = (target >= 0) & (target < num_answers)
    probs = np.full((len(x), num_answers), 1.0 / num_answers)
    classes = np.unique(target[keep])
    if classes.size == 1:
        probs = np.zeros_like(probs)
        probs[:, classes[0]] = 1.0
    elif classes.size > 1:
        fit = LogisticRegression(max_iter=2000).fit(
            predictor_features(
                x_pub[keep],
                y_public.numpy()[keep],
                column,
                schema,
                num_classes,
                with_label=with_label,
            ),
            target[keep],
        )
        rows = predictor_features(
            x.double().numpy(), y.numpy(), column, schema, num_classes, with_label=with_label
        )
        probs = np.zeros_like(probs)
        probs[:, fit.classes_] = fit.predict_proba(rows)
    probs = (1 - SMOOTHING) * probs + SMOOTHING / num_answers
    return np.log(probs)


def _granted_public(obs: Observation) -> bool:
    """Whether the adversary holds public records of a tabular task."""
    public = obs.side_info.get("public_data")
    return isinstance(public, Mapping) and "x" in public and obs.task.tabular is not None


class AttributeInferenceAttack(Infers):
    """Infer the hidden attribute of the target client's records from its updates.

    Fredrikson et al. (CCS 2015)'s white-box attribute inference adapted to federated updates:
    for every candidate record (known but for the hidden column) and every possible value, fill
    the column and ask how well the target client's local model in each round it took part in
    (the global model plus its update) explains the record's label; with public data granted,
    the prior probability of each value given the other columns is added (Bayes' rule). Scores
    are the log-posterior over values.

    Threat model: an honest-but-curious server that sees the target's individual updates and
    knows the architecture; the candidates (the target's records with the column hidden) and
    the possible values are given by the challenge.
    """

    name: ClassVar[str] = "attribute_inference"
    question: ClassVar[Question | None] = "attribute"
    needs_history: ClassVar[bool] = True

    def __init__(self, params: AttributeInferenceParams | None = None) -> None:
        self.params = params or AttributeInferenceParams()

    def _seen(self, obs: Observation) -> list[tuple[Observation, ClientUpdate]]:
        """Each round with the target's individual, non-empty update, oldest first."""
        out = []
        for view in rounds_of(obs):
            update = view.update_of(obs.target_client)
            if update is not None and update.num_examples > 0 and update.client_id >= 0:
                out.append((view, update))
        return out

    def _signal(self, update: ClientUpdate, lr: float | None) -> str:
        """``auto``: ``loss`` where the client's local model can be rebuilt, else
        ``gradient_alignment``."""
        if self.params.signal != "auto":
            return self.params.signal
        return "gradient_alignment" if update.kind == "gradient" and lr is None else "loss"

    def _uses_prior(self, obs: Observation, signal: str) -> bool:
        """``public`` always; ``auto`` when public data is granted and the evidence is the
        ``loss`` log-likelihood (the drop signals have no scale to weigh a prior against)."""
        if self.params.prior != "auto":
            return self.params.prior == "public"
        return signal == "loss" and _granted_public(obs)

    def _prior(
        self, obs: Observation, question: Mapping[str, object], x: Tensor, y: Tensor, signal: str
    ) -> np.ndarray:
        """log p(value | what is known without the model), from the granted public data.

        Without the label for ``loss`` (the label's likelihood is the evidence: Bayes' rule),
        with it for the drop signals.
        """
        public = obs.side_info["public_data"]
        return public_log_probs(
            public["x"],  # type: ignore[index]
            public["y"],  # type: ignore[index]
            x,
            y,
            question,
            obs.task.tabular,  # type: ignore[arg-type]
            obs.task.num_classes,
            with_label=signal != "loss",
        )

    def applicable(self, obs: Observation) -> str | None:
        """None when the question, the architecture and a target update are at hand."""
        if question_of(obs) is None:
            return (
                "no attribute question was given (side_info['candidates'] with x, y, column "
                "and values)"
            )
        if not obs.side_info.get("architecture"):
            return "the adversary does not know the model architecture"
        if obs.target_client < 0:
            return (
                "attribute inference reads the target client's own updates; the server sees "
                "only the aggregate"
            )
        seen = self._seen(obs)
        if not seen:
            if any(r.aggregate is not None and not r.updates for r in rounds_of(obs)):
                return "the server sees only the aggregate of the clients' updates"
            return f"client {obs.target_client} sent no update in any round the server saw"
        if self.params.prior == "public" and not _granted_public(obs):
            return "prior public needs the granted public data (threat.knows: public_data)"
        needs_local = self.params.signal in ("loss_drop", "loss")
        if needs_local and local_lr(obs) is None and all(u.kind == "gradient" for _, u in seen):
            return (
                f"signal {self.params.signal} rebuilds the client's FedSGD local model, which "
                "needs the local learning rate (grant local_hyperparameters, or use signal auto)"
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
        """Score every value of the hidden column for every candidate (`rng` is unused)."""
        question = question_of(obs)
        x, y = candidates(obs)  # type: ignore[misc]
        values = torch.as_tensor(question["values"], dtype=x.dtype)  # type: ignore[index]
        column = int(question["column"])  # type: ignore[index, arg-type]
        rows = filled_rows(x, column, values)
        labels = y.repeat_interleave(len(values))
        seen = self._seen(obs)
        lr = local_lr(obs)  # the federation's one local learning rate
        signal = self._signal(seen[0][1], lr)
        evidence = torch.zeros(len(rows), dtype=torch.float64)
        for done, (view, update) in enumerate(seen, start=1):
            if signal == "loss":
                state = local_state(model, view.global_params, update, lr)
                losses = record_losses(model, state, rows, labels)  # type: ignore[arg-type]
                evidence -= losses / len(seen)
            else:
                evidence += loss_change(model, view, update, rows, labels, signal=signal, lr=lr)
            if progress is not None:
                progress(done, len(seen))
        evidence = evidence.view(len(x), len(values)) / self.params.temperature
        prior = self._uses_prior(obs, signal)
        if prior:
            evidence += torch.as_tensor(self._prior(obs, question, x, y, signal))
        scores = torch.log_softmax(evidence, dim=1)
        asked = question.get("name")  # type: ignore[union-attr]
        details: dict[str, object] = {
            "method": "Fredrikson et al. 2015 on the target's local models: each value of the "
            "hidden column scored by the client's training on the completed record",
            "signal": signal,
            "attribute": asked,
            "column": column,
            "values": values.tolist(),
            "rounds": [view.round for view, _ in seen],
            "prior": "public" if prior else "none",
        }
        if asked is not None and asked != self.params.attribute:
            details["note"] = (
                f"the scenario's question is about {asked!r} (the first attribute_inference "
                f"entry's attribute), not this entry's {self.params.attribute!r}"
            )
        return scores, details
