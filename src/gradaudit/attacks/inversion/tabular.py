"""Gradient inversion of tabular rows: TabLeak (Vero et al., ICML 2023).

Vero, Balunović, Dimitrov & Vechev, "TabLeak: Tabular Data Leakage in Federated Learning",
ICML 2023. The attack matches the client's gradient in cosine distance (as Inverting Gradients)
over candidate rows whose categorical features are relaxed: each column is a softmax over its
codes of free logits, so the mixed discrete-continuous search becomes continuous; numeric
features are squashed into their plausible range by a sigmoid. Many restarts are run (30 in the
paper, each 1500 signed-Adam steps at learning rate 0.06, temperature 1, uniform start in
[-1, 1], true labels) and pooled: every restart's rows are matched to those of the restart with
the lowest projected loss, then the median over restarts is taken per feature (of the softmax
probabilities for a categorical one). The spread across restarts is the attacker's confidence:
the entropy of the pooled probabilities for a categorical feature and the Gaussian entropy of
the restarts' spread for a numeric one.

The relaxation pieces are public functions (`Relaxation`, `initial_free`, `relaxed_inputs`,
`project`, `relaxed_rows`, `pool_restarts`, `feature_entropy`, `feature_certainty`) for reuse
by joint inversions of tabular and other inputs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradaudit.attacks.base import (
    ProgressFn,
    Reconstructs,
    attacker_model,
    checked_update,
    gradient_estimate,
    not_applicable,
    sent_positions,
)
from gradaudit.attacks.inversion.codes import code_signal_keys, code_signals, present_codes
from gradaudit.attacks.inversion.consistency import (
    ConsistencyMode,
    enforce,
    plausible_bounds,
    rules_for,
)
from gradaudit.attacks.inversion.search import BestSoFar, Clock, schedule_factor, set_learning_rates
from gradaudit.attacks.labels import LabelMethod, labels_for_inversion, unknown_labels_reason
from gradaudit.metrics.tabular import TABLEAK_TOLERANCE, row_costs
from gradaudit.models.tabular import TabularMLP, one_hot
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction, TabularSchema

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the relaxation


@dataclass(frozen=True)
class Relaxation:
    """How free parameters become relaxed rows (TabLeak's softmax and sigmoid relaxations).

    The free parameters of N rows are one (..., N, `width`) tensor: first one value per numeric
    column, then a block of logits per categorical column.

    Attributes:
        low: per numeric column, the lowest value in model units.
        high: per numeric column, the highest.
        cardinalities: codes per categorical column.
        temperature: the softmax temperature (TabLeak: 1).
        support: per categorical column, a bool mask of the codes a row may take (the codes
            present in the batch, when the update reveals them), or None for all codes.
    """

    low: Tensor
    high: Tensor
    cardinalities: tuple[int, ...]
    temperature: float = 1.0
    support: tuple[Tensor, ...] | None = None

    @property
    def num_numeric(self) -> int:
        """Numeric columns."""
        return int(self.low.numel())

    @property
    def width(self) -> int:
        """Free parameters per row."""
        return self.num_numeric + sum(self.cardinalities)

    def blocks(self, z: Tensor) -> tuple[Tensor, list[Tensor]]:
        """`z` split into its numeric part and one logit block per categorical column."""
        n = self.num_numeric
        parts = list(torch.split(z[..., n:], list(self.cardinalities), dim=-1))
        return z[..., :n], parts


def initial_free(
    count: int, relaxation: Relaxation, *, restarts: int, rng: torch.Generator
) -> Tensor:
    """TabLeak's start: every free parameter uniform in [-1, 1], (restarts, count, width)."""
    return 2.0 * torch.rand((restarts, count, relaxation.width), generator=rng) - 1.0


def relaxed_inputs(z: Tensor, relaxation: Relaxation) -> tuple[Tensor, list[Tensor]]:
    """Relaxed rows from free parameters `z` (..., N, width).

    Numeric: ``low + (high - low) * sigmoid(z)``; categorical: ``softmax(z / temperature)``
    over the codes in the column's support (the others get probability 0).

    Example:
        >>> r = Relaxation(torch.tensor([-1.0]), torch.tensor([1.0]), (2,))
        >>> numeric, probs = relaxed_inputs(torch.tensor([[0.0, 0.0, 0.0]]), r)
        >>> numeric.tolist(), probs[0].tolist()
        ([[0.0]], [[0.5, 0.5]])
    """
    z_num, logits = relaxation.blocks(z)
    numeric = relaxation.low + (relaxation.high - relaxation.low) * torch.sigmoid(z_num)
    probs = []
    for j, block in enumerate(logits):
        block = block / relaxation.temperature
        if relaxation.support is not None:
            block = block.masked_fill(~relaxation.support[j], -math.inf)
        probs.append(torch.softmax(block, dim=-1))
    return numeric, probs


def project(probs: Sequence[Tensor]) -> list[Tensor]:
    """Each relaxed categorical block replaced by the one-hot vector of its most probable code.

    Example:
        >>> project([torch.tensor([[0.2, 0.7, 0.1]])])[0].tolist()
        [[0.0, 1.0, 0.0]]
    """
    return [one_hot(p.argmax(dim=-1), p.shape[-1]).to(p.dtype) for p in probs]


def relaxed_rows(numeric: Tensor, probs: Sequence[Tensor]) -> Tensor:
    """Rows in model space (numeric values, then the most probable code of each column as a
    float), the layout of `TabularSchema`.

    Example:
        >>> relaxed_rows(torch.tensor([[0.5]]), [torch.tensor([[0.2, 0.8]])]).tolist()
        [[0.5, 1.0]]
    """
    codes = [p.argmax(dim=-1, keepdim=True).to(numeric.dtype) for p in probs]
    return torch.cat([numeric, *codes], dim=-1)


@dataclass(frozen=True)
class Pooled:
    """Restarts pooled into one reconstruction (TabLeak's ensembling).

    Attributes:
        numeric: per row and numeric column, the median over restarts, (N, n).
        probs: per categorical column, the median probabilities over restarts renormalised,
            (N, card).
        numeric_std: per row and numeric column, the standard deviation over restarts, (N, n).
    """

    numeric: Tensor
    probs: list[Tensor]
    numeric_std: Tensor

    def rows(self) -> Tensor:
        """The pooled rows in model space."""
        return relaxed_rows(self.numeric, self.probs)


def pool_restarts(
    numeric: Tensor,
    probs: Sequence[Tensor],
    anchor: int,
    schema: TabularSchema,
    *,
    tolerance: float = TABLEAK_TOLERANCE,
) -> Pooled:
    """Pool R restarts of N rows: match each restart's rows to the `anchor` restart's, then take
    the median of every feature over restarts.

    Rows are matched by the Hungarian algorithm on the number of features that disagree (codes
    differ, numeric values further apart than `tolerance`), as TabLeak matches its ensemble.

    Args:
        numeric: (R, N, n) numeric values of each restart.
        probs: per categorical column, (R, N, card) probabilities of each restart.
        anchor: the restart the others are matched to (TabLeak: the lowest projected loss).
        schema: the column layout (numeric first, then categorical).
        tolerance: the numeric tolerance of the matching, model units.

    Example:
        >>> s = TabularSchema(("x",), ("c",), (2,))
        >>> numeric = torch.tensor([[[0.0], [5.0]], [[5.1], [0.2]], [[0.1], [4.9]]])
        >>> probs = [torch.tensor([[[1.0, 0], [0, 1]], [[0, 1], [1, 0]], [[1, 0], [0, 1]]])]
        >>> pool_restarts(numeric, probs, 0, s).rows().tolist()
        [[0.10000000149011612, 0.0], [5.0, 1.0]]
    """
    restarts = numeric.shape[0]
    rows = relaxed_rows(numeric, probs)
    order = []
    for r in range(restarts):
        cost = row_costs(rows[r], rows[anchor], schema, tolerance=tolerance)
        targets, picks = linear_sum_assignment(cost.cpu().numpy())
        perm = torch.empty(len(targets), dtype=torch.long)
        perm[torch.as_tensor(targets)] = torch.as_tensor(picks, dtype=torch.long)
        order.append(perm)
    index = torch.stack(order)  # (R, N): restart r's row matched to anchor row i
    gather = torch.arange(restarts)[:, None]
    aligned_num = numeric[gather, index]
    pooled_probs = []
    for p in probs:
        median = p[gather, index].median(dim=0).values
        pooled_probs.append(median / median.sum(dim=-1, keepdim=True).clamp_min(1e-12))
    std = aligned_num.std(dim=0) if restarts > 1 else torch.zeros_like(aligned_num[0])
    return Pooled(aligned_num.median(dim=0).values, pooled_probs, std)


def feature_entropy(pooled: Pooled) -> Tensor:
    """TabLeak's per-feature entropy of a pooled reconstruction, (N, F) in schema order.

    Numeric: the differential entropy of a Gaussian with the restarts' standard deviation,
    ``0.5 + 0.5 * log(2 pi sigma^2)`` (sigma floored at 1e-6). Categorical: the entropy of the
    pooled probabilities divided by ``log(cardinality)`` (0 = certain, 1 = uniform).
    """
    sigma = pooled.numeric_std.double().clamp_min(1e-6)
    parts = [0.5 + 0.5 * torch.log(2 * math.pi * sigma.pow(2))]
    for p in pooled.probs:
        p = p.double()
        h = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=-1, keepdim=True)
        parts.append(h / math.log(p.shape[-1]) if p.shape[-1] > 1 else torch.zeros_like(h))
    return torch.cat(parts, dim=-1)


def feature_certainty(pooled: Pooled) -> Tensor:
    """How sure the attacker is of each feature, in [0, 1], (N, F) in schema order.

    Categorical: 1 minus the normalised entropy of `feature_entropy`. Numeric: 1 minus the
    restarts' standard deviation in units of the column's own (capped at 1), i.e.
    ``1 - exp(h - h_column)`` with ``h`` the Gaussian entropy of the spread and ``h_column``
    that of the standardised column: the spread's entropy relative to knowing nothing.
    """
    entropy = feature_entropy(pooled)
    n = pooled.numeric.shape[-1]
    numeric = 1.0 - pooled.numeric_std.double().clamp(0.0, 1.0)
    return torch.cat([numeric, 1.0 - entropy[:, n:].clamp(0.0, 1.0)], dim=-1)


# --------------------------------------------------------------------------- gradient matching


class _Relaxed(nn.Module):
    """`TabularMLP.forward_relaxed` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, model: TabularMLP) -> None:
        super().__init__()
        self.model = model

    def forward(self, numeric: Tensor, *probs: Tensor) -> Tensor:
        return self.model.forward_relaxed(numeric, list(probs))


DistanceFn = Callable[[Tensor], Tensor]
"""``distance(z)``: for free parameters z (R, N, width) of R restarts, the (R,) cosine
distances between each restart's simulated gradient and the update (differentiable in z)."""


def cosine_matching(
    model: TabularMLP,
    target: dict[str, Tensor],
    labels: Tensor,
    relaxation: Relaxation,
    *,
    hard: bool = False,
) -> DistanceFn:
    """The reference matching: per restart, ``1 - cos`` between the update `target` (tensors by
    parameter name; the sent ones) and the mean cross-entropy gradient of the relaxed rows with
    `labels` over the parameters in `target`, via ``torch.func`` (grad of `forward_relaxed`,
    vmapped over restarts). With `hard` the categorical blocks are projected to one-hot first
    (TabLeak's projected loss). `gram_matching` computes the same values faster.
    """
    wrapper = _Relaxed(model)
    named = {f"model.{k}": v.detach() for k, v in model.named_parameters()}
    sent = {f"model.{k}" for k in target}
    fixed = {k: v for k, v in named.items() if k not in sent}
    free = {k: v for k, v in named.items() if k in sent}
    goal = {f"model.{k}": v.detach() for k, v in target.items()}
    goal_norm = torch.stack([t.pow(2).sum() for t in goal.values()]).sum().sqrt()

    def client_loss(params: dict[str, Tensor], numeric: Tensor, probs: list[Tensor]) -> Tensor:
        logits = functional_call(wrapper, {**fixed, **params}, (numeric, *probs))
        return nn.functional.cross_entropy(logits, labels)

    def distance(z: Tensor) -> Tensor:
        numeric, probs = relaxed_inputs(z, relaxation)
        if hard:
            probs = project(probs)
        grads = grad(client_loss)(free, numeric, probs)
        dot = torch.stack([(grads[k] * goal[k]).sum() for k in goal]).sum()
        norm = torch.stack([grads[k].pow(2).sum() for k in goal]).sum().sqrt()
        return 1.0 - dot / (norm * goal_norm + 1e-12)

    return vmap(distance)


def _bilinear_terms(inputs: Tensor, deltas: Tensor, goal: Tensor) -> tuple[Tensor, Tensor]:
    """For a weight whose per-restart gradient is ``G = deltas^T inputs`` ((R, N, out) and
    (R, N, in)), ``<G, goal>`` and ``|G|^2`` per restart. With few rows (``N (in + out) <
    in out``) G is never formed: ``sum(deltas * (inputs @ goal^T))`` and
    ``sum((deltas deltas^T) * (inputs inputs^T))``, from (N, N) Gram matrices; otherwise G is
    formed, which is then the cheaper way."""
    rows, width, out = inputs.shape[1], inputs.shape[2], deltas.shape[2]
    if rows * (width + out) < width * out:
        dot = (deltas * (inputs @ goal.T)).sum(dim=(1, 2))
        gram = (deltas @ deltas.transpose(1, 2)) * (inputs @ inputs.transpose(1, 2))
        return dot, gram.sum(dim=(1, 2))
    full = deltas.transpose(1, 2) @ inputs
    return (full * goal).sum(dim=(1, 2)), full.pow(2).sum(dim=(1, 2))


def gram_matching(
    model: TabularMLP,
    target: dict[str, Tensor],
    labels: Tensor,
    relaxation: Relaxation,
    *,
    hard: bool = False,
) -> DistanceFn:
    """`cosine_matching`'s distances computed through Gram matrices (faster, same values).

    Every weight of a `TabularMLP` (an embedding table, a Linear) has the per-restart gradient
    ``D^T A``: A the rows it reads (the code probabilities, the layer's input), D the loss's
    gradient at its output. The cosine needs only ``<D^T A, T>`` and ``|D^T A|^2``, which
    `_bilinear_terms` gets from (N, N) Gram matrices for small batches, so the (R, out, in)
    per-restart gradients are formed only where that is cheaper, and no vmap is needed; the
    distances and their gradients in `z` are those of `cosine_matching` up to float rounding.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    linears = [m for m in model.body if isinstance(m, nn.Linear)] + [model.head]
    goal = {k: v.detach() for k, v in target.items()}
    goal_norm = torch.stack([t.pow(2).sum() for t in goal.values()]).sum().sqrt()
    count = labels.shape[0]

    def distance(z: Tensor) -> Tensor:
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            numeric, probs = relaxed_inputs(z, relaxation)
            if hard:
                probs = project(probs)
            looked_up = [  # projected codes are constants: their lookups become leaves
                (p @ e.weight.detach()).requires_grad_(True) if hard else p @ e.weight.detach()
                for p, e in zip(probs, model.embeddings, strict=False)
            ]
            parts = looked_up if model.encoding == "embedding" else probs
            a = torch.cat([numeric, *parts], dim=-1)
            inputs, outputs = [], []
            for i, layer in enumerate(linears):
                inputs.append(a)
                h = a @ layer.weight.detach().T + layer.bias.detach()
                outputs.append(h)
                a = torch.relu(h) if i + 1 < len(linears) else h
            restarts = a.shape[0]
            loss = (
                nn.functional.cross_entropy(
                    a.reshape(restarts * count, -1), labels.repeat(restarts), reduction="sum"
                )
                / count
            )
            deltas = torch.autograd.grad(loss, outputs + looked_up, create_graph=True)
            dot = torch.zeros(restarts, dtype=z.dtype)
            square = torch.zeros(restarts, dtype=z.dtype)
            for layer, x, d in zip(linears, inputs, deltas, strict=False):
                weight, bias = names[id(layer.weight)], names[id(layer.bias)]
                if weight in goal:
                    terms = _bilinear_terms(x, d, goal[weight])
                    dot, square = dot + terms[0], square + terms[1]
                if bias in goal:
                    summed = d.sum(dim=1)
                    dot, square = dot + summed @ goal[bias], square + summed.pow(2).sum(dim=1)
            for p, e, d in zip(probs, model.embeddings, deltas[len(linears) :], strict=False):
                key = names[id(e.weight)]
                if key in goal:
                    terms = _bilinear_terms(p, d, goal[key].T)  # the table is (card, dim)
                    dot, square = dot + terms[0], square + terms[1]
            return 1.0 - dot / (square.clamp_min(1e-30).sqrt() * goal_norm + 1e-12)

    return distance


# --------------------------------------------------------------------------- the attack


class TabularInversionParams(BaseModel):
    """Parameters of `tabular_inversion` (defaults: TabLeak's recipe)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    iterations: int = Field(1500, ge=1, description="signed-Adam steps of every restart")
    restarts: int = Field(30, ge=1, description="restarts run together and pooled (TabLeak: 30)")
    lr: float = Field(0.06, gt=0, description="Adam step size")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the relaxation")
    signed: bool = Field(True, description="step on the sign of the gradient (TabLeak)")
    schedule: Literal["constant", "step", "cosine"] = Field(
        "constant", description="learning-rate schedule (TabLeak: constant)"
    )
    pooling: Literal["median", "best"] = Field(
        "median",
        description="median of the matched restarts (TabLeak), or only the restart with the "
        "lowest projected loss (TabLeak without pooling)",
    )
    restrict_support: bool = Field(
        True,
        description="let each categorical column take only the codes the update shows present "
        "(zero gradient rows of the first layer; see categorical_codes)",
    )
    numeric_bound: float = Field(
        4.0,
        gt=0,
        description="numeric columns without a known plausible range are kept within this many "
        "standard deviations of the mean",
    )
    consistency: ConsistencyMode = Field(
        "repair",
        description="domain rules on the pooled rows: off, repair (fix what can be fixed, drop "
        "the rest) or drop (keep only rows that break no rule)",
    )
    label_method: LabelMethod = Field("auto", description="label recovery when labels are unknown")
    max_rows: int = Field(256, ge=1, description="refuse updates computed on more examples")
    max_seconds: float | None = Field(None, gt=0, description="wall-clock budget of the search")


@dataclass(frozen=True)
class _Problem:
    """What the optimisation of one attack needs."""

    model: TabularMLP
    schema: TabularSchema
    relaxation: Relaxation
    labels: Tensor
    target: dict[str, Tensor]
    count: int


class TabularInversionAttack(Reconstructs):
    """Reconstruct the target's tabular rows from its update (TabLeak).

    Cosine gradient matching over relaxed rows (softmax over each categorical column's codes,
    sigmoid into each numeric column's range), many restarts optimised together, pooled by
    matching them to the best restart and taking the median per feature; per-feature entropy
    across restarts is the attacker's confidence. Labels are the granted ones when the threat
    model grants them, else recovered from the classifier head (`label_recovery`). Two
    refinements a server can afford: each column's codes are restricted to those the update
    shows present (`restrict_support`), and the pooled rows are checked against public domain
    rules (`consistency`; see `attacks.inversion.consistency`).

    Vero, Balunović, Dimitrov & Vechev, "TabLeak: Tabular Data Leakage in Federated Learning",
    ICML 2023. Threat model: an honest-but-curious server that sees the individual update.
    A FedAvg model change is matched as one gradient (`gradient_estimate`).
    """

    name: ClassVar[str] = "tabular_inversion"

    def __init__(self, params: TabularInversionParams) -> None:
        self.params = params

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        """Needs an individual update of a tabular model, the architecture and few enough rows."""
        limit = ("max_rows", self.params.max_rows)
        return checked_update(obs, attack=self.name, modality="tabular", limit=limit)

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Invert the target's update into rows."""
        update, reason = self._update(obs)
        if update is None:
            return not_applicable(self.name, obs, str(reason))
        if not isinstance(model, TabularMLP):
            return not_applicable(self.name, obs, f"{self.name} inverts a tabular_mlp")
        reason = unknown_labels_reason(obs, update, model)
        if reason is not None:
            return not_applicable(self.name, obs, reason)
        started = time.perf_counter()
        p = self.params
        labels, label_source = labels_for_inversion(
            obs, model, count=update.num_examples, method=p.label_method, rng=rng, train_mode=True
        )
        grads, grad_source = gradient_estimate(update, obs)
        problem, support_note = self._problem(obs, model, grads, labels, update.num_examples)
        search = BestSoFar(
            started=started,
            total=p.iterations,
            to_pixels=lambda z: z,
            max_seconds=p.max_seconds,
            progress=progress,
        )
        z = self._optimise(problem, rng, search, started)
        pooled, anchor, projected = self._pool(problem, z)
        rows = pooled.rows()
        certainty = feature_certainty(pooled)
        rules = rules_for(obs.task)
        enforced = enforce(rows, problem.schema, rules, mode=p.consistency, probs=pooled.probs)
        entropy = feature_entropy(pooled)
        columns = (*problem.schema.numeric, *problem.schema.categorical)
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(
                rows=enforced.rows,
                labels=labels,
                confidence=certainty.mean(dim=1),
                kept=enforced.kept if p.consistency != "off" else None,
            ),
            seconds=time.perf_counter() - started,
            details={
                "labels": label_source,
                "gradient": grad_source,
                "support": support_note,
                "restarts": p.restarts,
                "iterations_run": search.done,
                "anchor_restart": anchor,
                "objective": projected,
                "pooling": p.pooling,
                "feature_entropy": {
                    c: round(float(entropy[:, f].mean()), 4) for f, c in enumerate(columns)
                },
                "confidence": "mean over features of 1 - normalised entropy (categorical) and "
                "1 - restart spread in column stds (numeric)",
                "consistency": enforced.report,
                "recipe": p.model_dump(),
            },
            trace=tuple(search.trace),
        )

    def _problem(
        self,
        obs: Observation,
        model: TabularMLP,
        grads: dict[str, Tensor],
        labels: Tensor,
        count: int,
    ) -> tuple[_Problem, str]:
        """The attacker's model, the relaxation (bounds, support) and the target."""
        p = self.params
        schema = obs.task.tabular
        assert schema is not None
        attacker = attacker_model(model, obs)
        assert isinstance(attacker, TabularMLP)
        names = [name for name, _ in attacker.named_parameters()]
        keep = sent_positions(attacker, grads)
        target = {names[i]: grads[names[i]].detach() for i in keep}
        support = None
        note = "all codes of every column"
        if p.restrict_support:
            if all(key in grads for key in code_signal_keys(attacker)):
                present = present_codes(code_signals(attacker, grads))
                if all(len(codes) > 0 for codes in present):
                    support = tuple(
                        torch.isin(torch.arange(card), codes)
                        for card, codes in zip(schema.cardinalities, present, strict=True)
                    )
                    sizes = [len(codes) for codes in present]
                    note = f"restricted to the codes present in the update ({sizes} per column)"
            if support is None:
                note += " (the update does not show which codes are present)"
        low, high = plausible_bounds(obs.task, default=p.numeric_bound)
        relaxation = Relaxation(low, high, tuple(schema.cardinalities), p.temperature, support)
        problem = _Problem(attacker, schema, relaxation, labels, target, count)
        return problem, note

    def _optimise(
        self, problem: _Problem, rng: torch.Generator, search: BestSoFar, started: float
    ) -> Tensor:
        """All restarts together: signed Adam on the cosine distance (`gram_matching`)."""
        p = self.params
        distance = gram_matching(problem.model, problem.target, problem.labels, problem.relaxation)
        z = initial_free(problem.count, problem.relaxation, restarts=p.restarts, rng=rng)
        z.requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=p.lr)
        deadline = started + p.max_seconds if p.max_seconds else None
        clock = Clock.start(p.iterations, deadline)
        for step in range(p.iterations):
            set_learning_rates(optimiser, [p.lr], schedule_factor(p.schedule, clock.fraction(step)))
            costs = distance(z)
            (gradient,) = torch.autograd.grad(costs.sum(), [z])
            out_of_time = clock.out_of_time()
            last = out_of_time or step + 1 == p.iterations
            search.offer(z, float(costs.detach().min()), final=last)
            z.grad = gradient.sign() if p.signed else gradient
            optimiser.step()
            if out_of_time:
                logger.info("tabular_inversion stopped at step %d (max_seconds)", step + 1)
                break
        return z.detach()

    def _pool(self, problem: _Problem, z: Tensor) -> tuple[Pooled, int, float]:
        """Pool the restarts around the one with the lowest projected loss."""
        projected = gram_matching(
            problem.model, problem.target, problem.labels, problem.relaxation, hard=True
        )(z).detach()
        anchor = int(projected.argmin())
        numeric, probs = relaxed_inputs(z, problem.relaxation)
        if self.params.pooling == "best":
            numeric, probs = numeric[anchor : anchor + 1], [q[anchor : anchor + 1] for q in probs]
            pooled = pool_restarts(numeric, probs, 0, problem.schema)
        else:
            pooled = pool_restarts(numeric, probs, anchor, problem.schema)
        return pooled, anchor, float(projected[anchor])
