"""Joint gradient inversion of a record's structured fields and its note (fusion models).

A fusion model (`models.fusion`) reads a tabular record and a token sequence of the same
example; one client update therefore carries both, tied together by the shared label and by the
head that mixes the two branches. This attack recovers both from one update in one
gradient-matching optimisation:

* the fields are relaxed as TabLeak does (Vero, Balunović, Dimitrov & Vechev, "TabLeak: Tabular
  Data Leakage in Federated Learning", ICML 2023): a softmax over each categorical column's
  codes, restricted to the codes the update shows present, and a sigmoid into each numeric
  column's plausible range (`attacks.inversion.tabular`);
* the note is relaxed into token embeddings restricted to the tokens the update shows present
  (Balunović, Dimitrov, Jovanović & Vechev, "LAMP: Extracting Text from Gradients with Language
  Model Priors", NeurIPS 2022): each position's embedding is a softmax-weighted mixture of the
  present tokens' embedding rows, so a one-hot mixture is exactly a token;
* both are matched at once, with the same labels, by a per-block cosine distance (LAMP's
  layer-wise cosine, `attacks.inversion.text.gradient_distance`) whose blocks are the model's
  parameter tensors with every looked-up embedding row (a token's, a position's, a code's
  gradient) its own block, so the rows that carry the word order are not drowned by the large
  tensors;
* the projected candidate is then polished discretely: LAMP's rearrangements of each note
  (swaps, moves, replacements by present tokens, exchanges, lengths; `discrete_step`), scored
  by the gradient distance plus, when public text is granted, an n-gram language model's
  negative log-likelihood, and, when those random moves find nothing better, every present
  token at every position and every swap of two positions (`substitution_sweep`,
  `swap_sweep`); every present code of every field (`code_moves`);
  and a few Adam steps on the numeric fields (`numeric_polish`). TAG (Deng et al., "TAG:
  Gradient Attack on Transformer-based Language Models", Findings of EMNLP 2021) is the first
  text attack of this kind.

Sequence lengths come from the position-embedding gradient: its rows in use are the longest
note's positions (exact for one note). With several notes, each note that ends lowers the row
norms from its last position on; `sequence_lengths` finds those steps. For one note the same
gradient also orders its tokens (`attacks.inversion.tokens.position_assignment`), which is the
note's start by default (``init``); the fields and the note are still optimised together from
there, and ``init: random`` starts from uniform mixtures instead.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradaudit.attacks.base import (
    ProgressFn,
    Reconstructs,
    attacker_model,
    checked_update,
    gradient_estimate,
    not_applicable,
)
from gradaudit.attacks.inversion.codes import code_signal_keys, code_signals, present_codes
from gradaudit.attacks.inversion.consistency import plausible_bounds
from gradaudit.attacks.inversion.embedding import looked_up_rows
from gradaudit.attacks.inversion.language import NGramLanguageModel, public_prior
from gradaudit.attacks.inversion.search import BestSoFar, Clock, schedule_factor, set_learning_rates
from gradaudit.attacks.inversion.tabular import (
    Relaxation,
    initial_free,
    relaxed_inputs,
    relaxed_rows,
)
from gradaudit.attacks.inversion.text import (
    discrete_step,
    gradient_distance,
    in_use,
    substitution_sweep,
    swap_sweep,
)
from gradaudit.attacks.inversion.tokens import position_assignment
from gradaudit.attacks.labels import (
    LabelMethod,
    labels_for_inversion,
    unknown_labels_reason,
)
from gradaudit.models.fusion import FusionClassifier
from gradaudit.types import (
    AttackResult,
    ClientUpdate,
    Observation,
    Reconstruction,
    TabularSchema,
    TextSchema,
)

logger = logging.getLogger(__name__)

LENGTH_RATIO = 1.25
"""A note is taken to end where the position-embedding gradient's row norms fall by at least
this factor (measured on MTSamples notes at batch 4: exact lengths for 40 % of batches, 1.6
tokens off per note on average; all notes at the longest length is 7 off)."""

CONVERGED = 1e-7
"""A candidate whose distance is below this explains the update: the polish stops."""

CHUNK = 64
"""Discrete candidate batches whose gradients one vectorised call computes."""

START_LOGIT = 10.0
"""The logit a note's start gives the token the position assignment names: its mixture puts
more than 99.8 % of the weight on it among 24 tokens, and the saturated softmax keeps it there
while the fields converge."""

PROJECT_EVERY = 25
"""Continuous steps between projections of the candidate to codes and tokens; the projected
candidate with the lowest distance (not the relaxed one) goes on to the polish."""


# --------------------------------------------------------------------------- matching blocks


@dataclass(frozen=True)
class MatchBlocks:
    """The observed update cut into the blocks the distance compares.

    Every sent parameter tensor is one block, except the embedding tables named in `rows`:
    each of their looked-up rows (the gradient of one token, one position, one code) is a block
    of its own. Blocks whose observed gradient is exactly zero are left out.

    Attributes:
        names: the compared parameters, in ``named_parameters()`` order.
        rows: per split embedding table, the rows compared one by one.
        target: the observed blocks, in the order `cut` gives them.
    """

    names: tuple[str, ...]
    rows: Mapping[str, Tensor]
    target: tuple[Tensor, ...]

    def cut(self, grads: Mapping[str, Tensor]) -> list[Tensor]:
        """The blocks of a gradient keyed by parameter name (any extra leading dims kept)."""
        blocks: list[Tensor] = []
        for name in self.names:
            rows = self.rows.get(name)
            if rows is None:
                blocks.append(grads[name])
            else:
                blocks.extend(grads[name][..., int(r), :] for r in rows)
        return blocks

    def distance(self, grads: Mapping[str, Tensor]) -> Tensor:
        """The mean over blocks of ``1 - cos`` (`gradient_distance`)."""
        return gradient_distance(self.cut(grads), self.target)


def matching_blocks(
    model: nn.Module, grads: Mapping[str, Tensor], split: Sequence[str]
) -> MatchBlocks:
    """The `MatchBlocks` of update `grads` (the sent tensors by name) for `model`.

    Args:
        model: the architecture (its parameter order).
        grads: the observed gradient of every sent parameter.
        split: the embedding tables whose looked-up rows are blocks of their own.

    Example:
        >>> net = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 1))
        >>> g = {"0.weight": torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 0.0]]),
        ...      "1.weight": torch.ones(1, 2), "1.bias": torch.zeros(1)}
        >>> blocks = matching_blocks(net, g, ["0.weight"])
        >>> blocks.names, blocks.rows["0.weight"].tolist(), len(blocks.target)
        (('0.weight', '1.weight'), [1, 3], 3)
        >>> abs(float(blocks.distance(g))) < 1e-6
        True
    """
    names, rows = [], {}
    for name, _ in model.named_parameters():
        if name not in grads or not bool(grads[name].detach().ne(0).any()):
            continue
        names.append(name)
        if name in split:
            rows[name] = looked_up_rows(grads[name])
    if not names:
        raise ValueError("the update carries no non-zero gradient of the model's parameters")
    partial = MatchBlocks(tuple(names), rows, ())
    target = tuple(b.detach() for b in partial.cut(grads))
    return MatchBlocks(tuple(names), rows, target)


# --------------------------------------------------------------------------- lengths


def sequence_lengths(position_grad: Tensor, count: int, *, ratio: float = LENGTH_RATIO) -> Tensor:
    """The lengths of `count` right-padded notes, from the position-embedding gradient.

    Row ``l`` of the gradient is the sum over the notes longer than ``l`` of the gradient
    reaching their position ``l``: it is zero past the longest note (whose length is therefore
    exact) and it falls where a shorter note ends. Binary segmentation of the log row norms
    places up to ``count - 1`` ends, each where splitting a segment reduces the squared error
    most among the splits whose left level exceeds the right one by `ratio`; the notes left
    without an end get the longest length.

    Returns:
        int64 (count,), ascending.

    Example:
        >>> g = torch.ones(8, 2); g[:3] *= 4.0; g[6:] = 0.0   # notes end at 3 and at 6
        >>> sequence_lengths(g, 2).tolist(), sequence_lengths(g, 3).tolist()
        ([3, 6], [3, 6, 6])
    """
    used = looked_up_rows(position_grad)
    longest = int(used.max()) + 1 if used.numel() else 0
    if count == 1 or longest <= 1:
        return torch.full((count,), longest, dtype=torch.long)
    levels = position_grad.detach().double()[:longest].norm(dim=1).clamp_min(1e-300).log()

    def sse(v: Tensor) -> float:
        return float((v - v.mean()).pow(2).sum()) if v.numel() else 0.0

    ends: list[int] = []
    segments = [(0, longest)]
    while len(ends) < count - 1:
        best: tuple[float, int, tuple[int, int]] | None = None
        for a, b in segments:
            whole = sse(levels[a:b])
            for s in range(a + 1, b):
                left, right = levels[a:s], levels[s:b]
                if float(left.mean() - right.mean()) < math.log(ratio):
                    continue
                gain = whole - sse(left) - sse(right)
                if best is None or gain > best[0]:
                    best = (gain, s, (a, b))
        if best is None:
            break
        _, end, (a, b) = best
        ends.append(end)
        segments.remove((a, b))
        segments += [(a, end), (end, b)]
    return torch.tensor(sorted(ends) + [longest] * (count - len(ends)), dtype=torch.long)


# --------------------------------------------------------------------------- the problem


class _Relaxed(nn.Module):
    """`FusionClassifier.forward_relaxed` on mixtures of the allowed tokens' embedding rows,
    as a module's forward, for ``torch.func.functional_call`` and plain autograd alike."""

    def __init__(self, model: FusionClassifier, allowed: Tensor) -> None:
        super().__init__()
        self.model = model
        self.allowed = allowed

    def forward(self, numeric: Tensor, mixture: Tensor, keep: Tensor, *probs: Tensor) -> Tensor:
        table = self.model.text.token_embedding.weight[self.allowed]
        return self.model.forward_relaxed(numeric, list(probs), mixture @ table, keep)


@dataclass(frozen=True)
class JointProblem:
    """What one joint inversion needs, fixed for the whole attack.

    Attributes:
        model: the attacker's copy of the global model.
        labels: the candidates' labels (shared by both modalities).
        blocks: the observed update, cut into blocks.
        relaxation: TabLeak's relaxation of the fields (codes restricted to those present).
        allowed: the token ids present in the update, ascending.
        lengths: each note's length.
        tabular: the fields' schema.
        text: the notes' schema.
    """

    model: FusionClassifier
    labels: Tensor
    blocks: MatchBlocks
    relaxation: Relaxation
    allowed: Tensor
    lengths: Tensor
    tabular: TabularSchema
    text: TextSchema

    @property
    def count(self) -> int:
        """Examples behind the update."""
        return int(self.labels.numel())

    @property
    def longest(self) -> int:
        """Positions of the longest note."""
        return int(self.lengths.max())

    def keep(self, lengths: Tensor | None = None) -> Tensor:
        """(N, longest) bool: the positions in use."""
        used = self.lengths if lengths is None else lengths
        return torch.arange(self.longest) < used.unsqueeze(-1)

    def relaxed_distance(self, z: Tensor, text_logits: Tensor) -> Tensor:
        """The distance of relaxed candidates, differentiable in both: `z` (N, width) the
        fields' free parameters (`Relaxation`), `text_logits` (N, longest, K) per position a
        logit per allowed token."""
        numeric, probs = relaxed_inputs(z, self.relaxation)
        mixture = torch.softmax(text_logits, dim=-1)
        logits = _Relaxed(self.model, self.allowed)(numeric, mixture, self.keep(), *probs)
        loss = nn.functional.cross_entropy(logits, self.labels)
        params = dict(self.model.named_parameters())
        names = self.blocks.names
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
        return self.blocks.distance(dict(zip(names, grads, strict=True)))

    def decode(self, z: Tensor, text_logits: Tensor) -> tuple[Tensor, Tensor]:
        """The projected candidate: rows (N, F) in model space and padded tokens (N, L)."""
        numeric, probs = relaxed_inputs(z.detach(), self.relaxation)
        rows = relaxed_rows(numeric, probs)
        tokens = torch.full((self.count, self.text.max_length), self.text.pad_id)
        tokens[:, : self.longest] = self.allowed[text_logits.detach().argmax(dim=-1)]
        return rows, in_use(tokens, self.lengths, self.text.pad_id)

    def distances(self, inputs: Tensor) -> Tensor:
        """The distance of K discrete candidate batches `inputs` (K, N, F + L), float64 (K,)."""
        names = self.blocks.names
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        moving = {n: params[n] for n in names}
        fixed = {n: p for n, p in params.items() if n not in moving}
        model, labels, blocks = self.model, self.labels, self.blocks

        def loss(free: dict[str, Tensor], x: Tensor) -> Tensor:
            return nn.functional.cross_entropy(
                functional_call(model, {**fixed, **free}, (x,)), labels
            )

        gradient = grad(loss)

        def distance(x: Tensor) -> Tensor:
            return blocks.distance(gradient(moving, x))

        batched = vmap(distance)
        return torch.cat(
            [batched(inputs[i : i + CHUNK]).detach() for i in range(0, inputs.shape[0], CHUNK)]
        ).to(torch.float64)


def joined(rows: Tensor, tokens: Tensor) -> Tensor:
    """Model inputs (..., F + L) from rows (..., F) and token ids (..., L)."""
    return torch.cat([rows, tokens.to(rows.dtype)], dim=-1)


def code_moves(problem: JointProblem, rows: Tensor, tokens: Tensor) -> tuple[Tensor, float, int]:
    """Coordinate descent on the categorical fields: for each example and column in turn, every
    present code is tried and the best batch kept.

    Returns:
        The rows, their distance and how many codes changed.
    """
    x = joined(rows, tokens)
    cost = float(problem.distances(x[None])[0])
    changed = 0
    first = len(problem.tabular.numeric)
    support = problem.relaxation.support
    for i in range(problem.count):
        for j, cardinality in enumerate(problem.tabular.cardinalities):
            codes = (
                torch.nonzero(support[j]).flatten()
                if support is not None
                else torch.arange(cardinality)
            )
            if codes.numel() < 2:
                continue
            variants = x[None].repeat(codes.numel(), 1, 1)
            variants[:, i, first + j] = codes.to(x.dtype)
            costs = problem.distances(variants)
            best = int(torch.argmin(costs))
            if float(costs[best]) < cost and not torch.equal(variants[best], x):
                x, cost = variants[best], float(costs[best])
                changed += 1
    return x[:, : problem.tabular.num_features], cost, changed


def numeric_polish(
    problem: JointProblem, rows: Tensor, tokens: Tensor, *, steps: int, lr: float
) -> Tensor:
    """A few Adam steps on the numeric fields, the codes and tokens fixed (the exact forward),
    inside the relaxation's bounds; the best rows seen are returned."""
    n = len(problem.tabular.numeric)
    if n == 0 or steps == 0:
        return rows
    numeric = rows[:, :n].clone().requires_grad_(True)
    optimiser = torch.optim.Adam([numeric], lr=lr)
    params = dict(problem.model.named_parameters())
    names = problem.blocks.names
    best_rows, best = rows, float(problem.distances(joined(rows, tokens)[None])[0])
    for _ in range(steps):
        optimiser.zero_grad()
        x = joined(torch.cat([numeric, rows[:, n:]], dim=1), tokens)
        loss = nn.functional.cross_entropy(problem.model(x), problem.labels)
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=True)
        distance = problem.blocks.distance(dict(zip(names, grads, strict=True)))
        if float(distance.detach()) < best:
            best, best_rows = (
                float(distance.detach()),
                torch.cat([numeric.detach(), rows[:, n:]], dim=1),
            )
        distance.backward()
        optimiser.step()
        with torch.no_grad():
            numeric.copy_(
                torch.maximum(
                    torch.minimum(numeric, problem.relaxation.high), problem.relaxation.low
                )
            )
    return best_rows.clone()


# --------------------------------------------------------------------------- the attack


class MultimodalInversionParams(BaseModel):
    """Parameters of `multimodal_inversion`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    iterations: int = Field(300, ge=1, description="continuous Adam steps per restart")
    restarts: int = Field(1, ge=1, description="continuous starts; the best projected one is kept")
    lr: float = Field(0.05, gt=0, description="Adam step size of the continuous phase")
    schedule: Literal["cosine", "step", "constant"] = Field(
        "cosine", description="learning-rate schedule of the continuous phase"
    )
    polish_rounds: int = Field(
        30,
        ge=0,
        description="discrete rounds after the continuous phase: LAMP steps on the notes, every "
        "present code of every field, Adam steps on the numeric fields; stops after `patience` "
        "rounds without improvement",
    )
    patience: int = Field(4, ge=1, description="polish rounds without improvement before stopping")
    candidates: int = Field(
        100, ge=1, description="note variants per example in a LAMP discrete step (LAMP: 200)"
    )
    prior_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the n-gram language model's mean negative log-likelihood per "
        "token in the discrete steps, relative to the current gradient distance (the prior "
        "weighs prior_weight * distance, so an exact match is never traded for a likelier "
        "note); trained on the granted public notes; 0 (the default: on MTSamples it did not "
        "help, docs/BENCHMARKS.md), or no public data, disables it",
    )
    row_blocks: bool = Field(
        True,
        description="compare every looked-up embedding row (a token's, a position's, a code's "
        "gradient) as a block of its own; False compares whole tensors (LAMP's layer-wise cosine)",
    )
    lm_order: int = Field(3, ge=1, le=5, description="n of the n-gram prior")
    numeric_steps: int = Field(
        10, ge=0, description="Adam steps on the numeric fields per polish round"
    )
    numeric_bound: float = Field(
        4.0,
        gt=0,
        description="numeric fields without a known plausible range are kept within this many "
        "standard deviations of the mean",
    )
    length_ratio: float = Field(
        LENGTH_RATIO,
        gt=1,
        description="several notes: a note ends where the position-gradient row norms fall by "
        "this factor",
    )
    rtol: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="embedding rows above this share of the largest norm count as present "
        "(tokens and codes; 0: exact, raise under noise)",
    )
    init: Literal["auto", "positions", "random"] = Field(
        "auto",
        description="the note's start: positions (one note: its tokens in order from the "
        "position-embedding gradient, `text_tokens`' assignment, then optimised jointly with the "
        "fields), random (uniform mixtures plus noise); auto = positions where it applies",
    )
    label_method: LabelMethod = Field("auto", description="label recovery when labels are unknown")
    max_examples: int = Field(8, ge=1, description="refuse updates computed on more examples")
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="wall-clock budget: the continuous phase gets 60 % of it, the polish the rest",
    )


class MultimodalInversionAttack(Reconstructs):
    """Reconstruct the target's records, structured fields and note together, from its update.

    One gradient-matching optimisation over both modalities (TabLeak's relaxation of the
    fields, LAMP/TAG's token embeddings restricted to the tokens present, shared labels), then a
    discrete polish (LAMP's rearrangements with an n-gram prior, code and numeric steps); see
    the module docstring.

    The language prior (off by default) follows the match: LAMP adds ``0.2 * perplexity`` to a
    BERT-sized cosine distance, but a small fusion model's distances are orders of magnitude
    smaller, and at batch 1 the gradient pins the note exactly, so a fixed weight trades the
    exact note for a likelier one (measured: ROUGE-2 1.0 without the prior, 0.86 with weight
    0.005, 0.34 with 0.2). Each round the prior weighs ``prior_weight`` times the current
    distance instead: it decides among near-ties while the match is poor and vanishes as the
    match becomes exact. Even so, a 3-gram model of MTSamples' 81 held-out notes did not help at
    batch 4 (docs/BENCHMARKS.md), so it is off unless asked for.

    Labels are the granted ones when the threat model grants them, else recovered from the
    classifier head (iDLG at batch 1, the bias gradient above).

    Vero et al., "TabLeak", ICML 2023; Balunović et al., "LAMP", NeurIPS 2022; Deng et al.,
    "TAG", Findings of EMNLP 2021. Threat model: an honest-but-curious server that sees the
    individual update and knows the architecture and the public vocabulary. A FedAvg model
    change is matched as one gradient (`gradient_estimate`).
    """

    name: ClassVar[str] = "multimodal_inversion"

    def __init__(self, params: MultimodalInversionParams) -> None:
        self.params = params

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        """Needs a multimodal task, the target's individual update, the architecture and few
        enough examples."""
        limit = ("max_examples", self.params.max_examples)
        return checked_update(obs, attack=self.name, modality="multimodal", limit=limit)

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Invert the target's update into rows and notes."""
        update, reason = self._update(obs)
        if update is None:
            return not_applicable(self.name, obs, str(reason))
        if not isinstance(model, FusionClassifier):
            return not_applicable(self.name, obs, f"{self.name} inverts a fusion model")
        grads, grad_source = gradient_estimate(update, obs)
        attacker = attacker_model(model, obs)
        assert isinstance(attacker, FusionClassifier)
        keys = _embedding_keys(attacker)
        missing = [k for k in (keys["token"], keys["position"], *keys["codes"]) if k not in grads]
        if missing:
            return not_applicable(
                self.name, obs, f"the client withheld the gradient of {', '.join(missing)}"
            )
        reason = unknown_labels_reason(obs, update, model)
        if reason is not None:
            return not_applicable(self.name, obs, reason)
        started = time.perf_counter()
        p = self.params
        count = update.num_examples
        labels, label_source = labels_for_inversion(
            obs, attacker, count=count, method=p.label_method, rng=rng, train_mode=True
        )
        problem, facts = self._problem(obs, attacker, grads, labels, keys)
        deadline = started + p.max_seconds if p.max_seconds else None
        search = BestSoFar(
            started=started,
            total=p.iterations * p.restarts,
            to_pixels=lambda z: z,
            max_seconds=p.max_seconds,
            progress=progress,
        )
        start, facts["note"]["init"] = self._start(problem, grads, keys)
        rows, tokens, relaxed = self._continuous(problem, start, rng, search, deadline)
        continuous_seconds = time.perf_counter() - started
        prior, prior_note = public_prior(obs, problem.text, order=p.lm_order, weight=p.prior_weight)
        rows, tokens, lengths, cost, polish = self._polish(
            problem, rows, tokens, prior, rng, started, deadline
        )
        facts["note"]["lengths_final"] = lengths.tolist()
        facts["note"]["prior"] = prior_note
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(
                rows=rows,
                tokens=tokens,
                labels=labels,
                confidence=torch.full((count,), -cost, dtype=torch.float64),
            ),
            seconds=time.perf_counter() - started,
            details={
                "labels": label_source,
                "gradient": grad_source,
                "fields": facts["fields"],
                "note": facts["note"],
                "blocks": len(problem.blocks.target),
                "iterations_run": search.done,
                "objective_relaxed": relaxed,
                "seconds_continuous": continuous_seconds,
                "polish": polish,
                "objective": cost,
                "recipe": p.model_dump(),
            },
            trace=tuple(search.trace),
        )

    # ----------------------------------------------------------------------- set-up

    def _problem(
        self,
        obs: Observation,
        model: FusionClassifier,
        grads: Mapping[str, Tensor],
        labels: Tensor,
        keys: dict[str, list[str] | str],
    ) -> tuple[JointProblem, dict[str, dict[str, object]]]:
        """The blocks, the fields' relaxation, the tokens present and the lengths."""
        p = self.params
        tabular, text = obs.task.tabular, obs.task.text
        assert tabular is not None and text is not None
        token_key, position_key, code_keys = keys["token"], keys["position"], keys["codes"]
        assert isinstance(token_key, str) and isinstance(position_key, str)
        assert isinstance(code_keys, list)
        allowed = looked_up_rows(grads[token_key], rtol=p.rtol)
        allowed = allowed[allowed != text.pad_id]
        if allowed.numel() == 0:
            allowed = torch.arange(text.vocab_size)
            allowed = allowed[allowed != text.pad_id]
        lengths = sequence_lengths(grads[position_key], labels.numel(), ratio=p.length_ratio)
        if int(lengths.max()) == 0:
            lengths = torch.full_like(lengths, text.max_length)
        branch = {
            k.removeprefix("tabular."): v for k, v in grads.items() if k.startswith("tabular.")
        }
        present = present_codes(code_signals(model.tabular, branch), rtol=p.rtol)
        support = tuple(
            torch.zeros(c, dtype=torch.bool).index_fill(0, codes, True)
            if codes.numel()
            else torch.ones(c, dtype=torch.bool)
            for c, codes in zip(tabular.cardinalities, present, strict=True)
        )
        low, high = plausible_bounds(obs.task, default=p.numeric_bound)
        relaxation = Relaxation(low, high, tuple(tabular.cardinalities), support=support)
        split = [token_key, position_key] if p.row_blocks else []
        if model.tabular.encoding == "embedding" and p.row_blocks:
            split += code_keys
        blocks = matching_blocks(model, grads, split)
        problem = JointProblem(model, labels, blocks, relaxation, allowed, lengths, tabular, text)
        names = tabular.categories or tuple(
            tuple(str(c) for c in range(k)) for k in tabular.cardinalities
        )
        facts: dict[str, dict[str, object]] = {
            "fields": {
                "codes_present": {
                    column: [names[j][int(c)] for c in codes]
                    for j, (column, codes) in enumerate(
                        zip(tabular.categorical, present, strict=True)
                    )
                },
                "relaxation": "TabLeak: softmax over the present codes, sigmoid into the "
                "plausible numeric range",
            },
            "note": {
                "distinct_tokens": int(allowed.numel()),
                "lengths": lengths.tolist(),
                "length_method": "exact: the position-embedding rows in use"
                if labels.numel() == 1
                else "steps of the position-embedding row norms (longest exact)",
                "relaxation": "softmax mixture of the present tokens' embedding rows",
            },
        }
        return problem, facts

    # ----------------------------------------------------------------------- the search

    def _start(
        self, problem: JointProblem, grads: Mapping[str, Tensor], keys: dict[str, list[str] | str]
    ) -> tuple[Tensor | None, str]:
        """The first start's note: per position the index (into the allowed tokens) of its token
        from the position-embedding gradient, or None; and how the note started."""
        if self.params.init == "random":
            return None, "random"
        if problem.count != 1:
            return None, "random (the position assignment needs one note)"
        token_key, position_key = keys["token"], keys["position"]
        assert isinstance(token_key, str) and isinstance(position_key, str)
        found = position_assignment(
            grads[token_key][problem.allowed], grads[position_key][: problem.longest]
        )
        if found.owner is None:
            return None, f"random (no exact position assignment; residual {found.residual:.3g})"
        return found.owner[None], f"positions (assignment residual {found.residual:.3g})"

    def _continuous(
        self,
        problem: JointProblem,
        start: Tensor | None,
        rng: torch.Generator,
        search: BestSoFar,
        deadline: float | None,
    ) -> tuple[Tensor, Tensor, float]:
        """Adam on the relaxed fields and notes from `restarts` starts; of the projected
        candidates (every `PROJECT_EVERY` steps, where each run ended and at its lowest relaxed
        distance) the one with the lowest distance, and the lowest relaxed distance."""
        p = self.params
        cont_deadline = None
        if deadline is not None:
            cont_deadline = search.started + 0.6 * (deadline - search.started)
        best: tuple[float, Tensor, Tensor] | None = None
        relaxed_best = math.inf
        for restart in range(p.restarts):
            z = initial_free(problem.count, problem.relaxation, restarts=1, rng=rng)[0]
            z.requires_grad_(True)
            shape = (problem.count, problem.longest, problem.allowed.numel())
            logits = 0.1 * torch.randn(shape, generator=rng)
            if start is not None and restart == 0:
                logits += START_LOGIT * nn.functional.one_hot(start, shape[-1])
            logits.requires_grad_(True)
            optimiser = torch.optim.Adam([z, logits], lr=p.lr)
            clock = Clock.start(p.iterations, cont_deadline, p.restarts - restart)
            restart_best: tuple[float, Tensor, Tensor] | None = None
            for step in range(p.iterations):
                set_learning_rates(
                    optimiser, [p.lr], schedule_factor(p.schedule, clock.fraction(step))
                )
                optimiser.zero_grad()
                distance = problem.relaxed_distance(z, logits)
                value = float(distance.detach())
                if restart_best is None or value < restart_best[0]:
                    restart_best = (value, z.detach().clone(), logits.detach().clone())
                out = clock.out_of_time()
                last = out or step + 1 == p.iterations
                if step % PROJECT_EVERY == 0:
                    best = _better(best, problem, z, logits)
                search.offer(
                    torch.cat([z.detach().flatten(), logits.detach().flatten()]),
                    value,
                    final=last,
                )
                if out:
                    break
                distance.backward()
                optimiser.step()
            assert restart_best is not None
            best = _better(best, problem, z, logits)  # where the run ended
            best = _better(best, problem, restart_best[1], restart_best[2])
            relaxed_best = min(relaxed_best, restart_best[0])
            logger.info(
                "multimodal_inversion restart %d: best relaxed %.4g, best projected %.4g",
                restart,
                restart_best[0],
                best[0],
            )
        assert best is not None
        return best[1], best[2], relaxed_best

    def _polish(
        self,
        problem: JointProblem,
        rows: Tensor,
        tokens: Tensor,
        prior: NGramLanguageModel | None,
        rng: torch.Generator,
        started: float,
        deadline: float | None,
    ) -> tuple[Tensor, Tensor, Tensor, float, dict[str, object]]:
        """The discrete polish; returns rows, tokens, lengths, distance and facts."""
        p = self.params
        pad = problem.text.pad_id
        longest = problem.longest
        lengths = problem.lengths.clone()
        work = tokens[:, :longest].clone()
        weight = [0.0]  # the prior's weight this round (see the class docstring)

        def score(cand_tokens: Tensor, cand_lengths: Tensor) -> Tensor:
            padded = torch.full(
                (*cand_tokens.shape[:-1], problem.text.max_length), pad, dtype=torch.long
            )
            padded[..., :longest] = in_use(cand_tokens, cand_lengths, pad)
            x = joined(rows.expand(cand_tokens.shape[0], -1, -1), padded)
            costs = problem.distances(x)
            if prior is not None and weight[0] > 0:
                nll = torch.stack([prior.nll(t).mean() for t in padded])
                costs = costs + weight[0] * nll
            return costs

        def padded_tokens() -> Tensor:
            out = torch.full((problem.count, problem.text.max_length), pad, dtype=torch.long)
            out[:, :longest] = in_use(work, lengths, pad)
            return out

        rounds = stale = codes_changed = sweeps = 0
        for _ in range(p.polish_rounds):
            distance = float(problem.distances(joined(rows, padded_tokens())[None])[0])
            if distance < CONVERGED or (deadline is not None and time.perf_counter() >= deadline):
                break
            rounds += 1
            weight[0] = p.prior_weight * max(distance, 0.0) if prior is not None else 0.0
            before = float(score(work[None], lengths[None])[0])
            work, lengths, _, _ = discrete_step(
                work,
                lengths,
                score,
                candidates=p.candidates,
                rng=rng,
                pool=problem.allowed,
                full_length=longest,
            )
            if float(score(work[None], lengths[None])[0]) >= before - 1e-9:
                sweeps += 1  # LAMP's random moves found nothing better: try every neighbour
                work, _ = substitution_sweep(work, lengths, score, problem.allowed)
                work, _ = swap_sweep(work, lengths, score)
            rows, _, changed = code_moves(problem, rows, padded_tokens())
            codes_changed += changed
            rows = numeric_polish(problem, rows, padded_tokens(), steps=p.numeric_steps, lr=p.lr)
            after = float(score(work[None], lengths[None])[0])
            stale = stale + 1 if after >= before - 1e-9 else 0
            if stale >= p.patience:
                break
        final = padded_tokens()
        distance = float(problem.distances(joined(rows, final)[None])[0])
        facts: dict[str, object] = {
            "rounds": rounds,
            "codes_changed": codes_changed,
            "exhaustive_sweeps": sweeps,
            "seconds": time.perf_counter() - started,
        }
        return rows, final, lengths, distance, facts


def _better(
    best: tuple[float, Tensor, Tensor] | None, problem: JointProblem, z: Tensor, logits: Tensor
) -> tuple[float, Tensor, Tensor]:
    """`best` or the projection of ``(z, logits)``, whichever has the lower distance."""
    rows, tokens = problem.decode(z, logits)
    projected = float(problem.distances(joined(rows, tokens)[None])[0])
    return best if best is not None and best[0] <= projected else (projected, rows, tokens)


def _embedding_keys(model: FusionClassifier) -> dict[str, list[str] | str]:
    """The update keys of the token and position embeddings and of the code signals."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        "token": names[id(model.text.token_embedding.weight)],
        "position": names[id(model.text.position_embedding.weight)],
        "codes": [f"tabular.{k}" for k in code_signal_keys(model.tabular)],
    }


__all__ = [
    "JointProblem",
    "MatchBlocks",
    "MultimodalInversionAttack",
    "MultimodalInversionParams",
    "code_moves",
    "joined",
    "matching_blocks",
    "numeric_polish",
    "sequence_lengths",
]
