"""Text inversion: a client's sentences, word order included, from its update (TAG, LAMP).

The attack optimises continuous token embeddings so that the gradient they produce matches the
observed one, as TAG does (Deng et al., "TAG: Gradient Attack on Transformer-based Language
Models", Findings of EMNLP 2021: an L2 + alpha·L1 gradient distance), and alternates that with
discrete steps that rearrange the current sentence, ranked by the gradient distance plus a
language model's score, as LAMP does (Balunović, Dimitrov, Jovanović & Vechev, "LAMP:
Extracting Text from Gradients with Language Model Priors", NeurIPS 2022: a cosine gradient
distance, an embedding-norm regulariser, the vocabulary restricted to the tokens whose
embedding row has a gradient, and swap/move candidates scored with GPT-2's perplexity).

The pieces are public functions so that other inversions (a joint tabular + text one) reuse
them: :func:`gradient_distance` and :func:`gradient_matching_loss` (the matching objective on
any relaxed input), :func:`nearest_tokens` (projection of embeddings to allowed tokens),
:func:`rearrangements` and :func:`discrete_step` (LAMP's discrete step, for any scoring
function), :func:`substitution_sweep`, :func:`swap_sweep` and :func:`exchange_sweep` (exhaustive
one- and two-position neighbourhoods), :func:`ranking_cost` (distance and prior combined),
and :class:`TokenMatcher` (the distance of continuous embeddings and of many discrete
candidates at once, for a model with ``forward_embeddings``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
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
from gradaudit.attacks.inversion.embedding import looked_up_rows
from gradaudit.attacks.inversion.language import NGramLanguageModel, public_prior
from gradaudit.attacks.inversion.search import BestSoFar, Clock
from gradaudit.attacks.inversion.tokens import (
    position_assignment,
    position_embedding_key,
    token_embedding_key,
)
from gradaudit.attacks.labels import LabelMethod, labels_for_inversion, unknown_labels_reason
from gradaudit.attacks.validation import leave_one_out_cosines
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction, TextSchema

logger = logging.getLogger(__name__)

MatchLoss = Literal["cosine", "tag"]

TAG_ALPHA = 0.01
"""Weight of TAG's L1 term (LAMP's tuned TAG baseline, ``--tag_factor 0.01``)."""

MAX_SWEEP_POOL = 512
"""The polish tries every allowed token at every position only when there are at most this
many (a withheld token embedding or a noisy gradient can allow the whole vocabulary)."""

CONVERGED = 1e-7
"""A candidate whose cosine distance is below this explains the update: the search stops."""

Score = Callable[[Tensor, Tensor], Tensor]
"""``score(tokens (K, N, L), lengths (K, N)) -> (K,)`` costs of K candidate batches."""


# --------------------------------------------------------------------------- matching objective


def gradient_distance(
    grads: Sequence[Tensor],
    target: Sequence[Tensor],
    *,
    loss: MatchLoss = "cosine",
    alpha: float = TAG_ALPHA,
) -> Tensor:
    """The distance between a candidate's gradient and the observed one, tensor by tensor.

    ``cosine`` (LAMP): the mean over tensors of ``1 - cos(g, t)``, so every layer counts
    alike whatever its scale. ``tag`` (TAG): ``sum ||g - t||^2 + alpha * sum |g - t|``, the L1
    term giving small-valued layers more say than L2 alone.

    Example:
        >>> g = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
        >>> float(gradient_distance(g, [torch.tensor([0.0, 1.0]), torch.tensor([4.0])]))
        0.5
        >>> float(gradient_distance(g, [torch.tensor([1.0, 1.0]), torch.tensor([2.0])],
        ...                         loss="tag", alpha=0.5))
        1.5
    """
    if len(grads) != len(target) or not grads:
        raise ValueError(f"{len(grads)} gradient tensors against {len(target)} observed ones")
    if loss == "cosine":
        terms = [
            1.0
            - (g * t).sum()
            / ((g * g).sum().clamp_min(1e-30).sqrt() * (t * t).sum().clamp_min(1e-30).sqrt())
            for g, t in zip(grads, target, strict=True)
        ]
        return torch.stack(terms).mean()
    if loss == "tag":
        terms = [
            (g - t).pow(2).sum() + alpha * (g - t).abs().sum()
            for g, t in zip(grads, target, strict=True)
        ]
        return torch.stack(terms).sum()
    raise ValueError(f"unknown gradient distance {loss!r}; use cosine or tag")


def gradient_matching_loss(
    logits: Tensor,
    labels: Tensor,
    params: Sequence[Tensor],
    target: Sequence[Tensor],
    *,
    loss: MatchLoss = "cosine",
    alpha: float = TAG_ALPHA,
    create_graph: bool = True,
) -> Tensor:
    """:func:`gradient_distance` between the gradient of ``cross_entropy(logits, labels)``
    (the client's mean loss) with respect to `params` and the observed `target`.

    `logits` may come from any relaxed input (continuous token embeddings, softmax-relaxed
    categories); with ``create_graph`` the result is differentiable in that input.
    """
    ce = nn.functional.cross_entropy(logits, labels)
    grads = torch.autograd.grad(ce, list(params), create_graph=create_graph)
    return gradient_distance(grads, target, loss=loss, alpha=alpha)


def nearest_tokens(embeddings: Tensor, table: Tensor) -> Tensor:
    """Project embeddings to the closest rows of `table` by cosine similarity (LAMP's
    ``get_closest_tokens(metric='cos')``).

    Args:
        embeddings: (..., D) continuous embeddings.
        table: (K, D) the allowed tokens' embeddings.

    Returns:
        (...) int64 row indices into `table`.

    Example:
        >>> table = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> nearest_tokens(torch.tensor([[[0.2, 3.0], [5.0, 1.0]]]), table).tolist()
        [[1, 0]]
    """
    unit = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (embeddings @ unit.T).argmax(dim=-1)


# --------------------------------------------------------------------------- discrete step

MOVES = ("swap", "move_token", "move_span", "rotate")
"""LAMP's transformations of a sentence: swap two tokens, move a token, move a span, put a
prefix at the end."""


def rearrangement(length: int, move: str, rng: torch.Generator) -> Tensor:
    """A random permutation of ``range(length)`` of the kind `move` (one of `MOVES`).

    Example:
        >>> perm = rearrangement(6, "move_span", torch.Generator().manual_seed(0))
        >>> sorted(perm.tolist())
        [0, 1, 2, 3, 4, 5]
    """
    order = torch.arange(length)
    if length < 2:
        return order

    def draw(high: int) -> int:
        return int(torch.randint(high, (1,), generator=rng))

    if move == "swap":
        i, j = draw(length), draw(length - 1)
        j += j >= i
        order[[i, j]] = order[[j, i]]
        return order
    if move == "move_token":
        i, j = draw(length), draw(length - 1)
        rest = torch.cat([order[:i], order[i + 1 :]])
        return torch.cat([rest[:j], order[i : i + 1], rest[j:]])
    if move == "move_span":
        b, e = sorted((draw(length + 1), draw(length + 1)))
        if e - b in (0, length):
            b, e = 0, max(1, length // 2)
        span, rest = order[b:e], torch.cat([order[:b], order[e:]])
        p = draw(rest.numel()) if rest.numel() > 1 else 0
        p += p >= b  # a different place than where the span was
        p = min(p, rest.numel())
        return torch.cat([rest[:p], span, rest[p:]])
    if move == "rotate":
        i = 1 + draw(length - 1)
        return torch.cat([order[i:], order[:i]])
    raise ValueError(f"unknown move {move!r}; use one of {MOVES}")


def rearrangements(
    tokens: Tensor,
    lengths: Tensor,
    sentence: int,
    count: int,
    rng: torch.Generator,
    *,
    pool: Tensor | None = None,
    full_length: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """`count` candidate batches that differ from ``(tokens, lengths)`` in one sentence.

    Candidate 0 is the batch unchanged. The others cycle through LAMP's four rearrangements of
    the sentence's tokens (`MOVES`), then, when `pool` is given, the replacement of one token
    by a token of the pool (the ids the embedding gradient shows, those missing from the batch
    first) and, with several sentences, an exchange of one token or of a span of positions
    between this sentence and another; when `full_length` is given (several sentences), a new
    length for this sentence (at most `full_length`, which some sentence keeps: the
    position-embedding gradient shows the longest sequence).

    Args:
        tokens: (N, L) token ids; positions at or after a sentence's length are kept as they
            are (a later, longer length brings them back) but are padding to the model.
        lengths: (N,) sentence lengths.
        sentence: the sentence to change.
        count: candidates wanted (the unchanged batch included).
        rng: the random stream.
        pool: token ids a replacement may use, or None for rearrangements only.
        full_length: the longest length a sentence may take; None keeps the lengths.

    Returns:
        ``(tokens (K, N, L), lengths (K, N), source (K, N, L))``: `source` gives, per position,
        the flat index ``n * L + l`` of the position it was taken from (its own index when the
        token was replaced), so continuous embeddings can follow the same move.
    """
    n_sent, width = tokens.shape
    full = width if full_length is None else full_length
    flat = torch.arange(n_sent * width).view(n_sent, width)
    kinds = list(MOVES)
    if pool is not None and pool.numel():
        kinds.append("replace")
        if n_sent > 1:
            kinds += ["exchange", "exchange_span"]
    if full_length is not None and n_sent > 1:
        kinds.append("length")
    out_tokens, out_lengths, out_source = [tokens.clone()], [lengths.clone()], [flat.clone()]
    length = int(lengths[sentence])
    present = {t for n in range(n_sent) for t in tokens[n, : int(lengths[n])].tolist()}
    missing = (
        torch.tensor([t for t in pool.tolist() if t not in present], dtype=torch.long)
        if pool is not None
        else None
    )
    for k in range(1, count):
        kind = kinds[(k - 1) % len(kinds)]
        new_tokens, new_lengths, source = tokens.clone(), lengths.clone(), flat.clone()
        if kind in MOVES:
            perm = rearrangement(length, kind, rng)
            new_tokens[sentence, :length] = tokens[sentence, perm]
            source[sentence, :length] = flat[sentence, perm]
        elif kind == "replace":
            assert pool is not None and missing is not None
            choices = missing if missing.numel() and k % 2 == 1 else pool
            pick = choices[int(torch.randint(choices.numel(), (1,), generator=rng))]
            at = int(torch.randint(max(length, 1), (1,), generator=rng))
            new_tokens[sentence, at] = pick
        elif kind == "exchange":
            other = int(torch.randint(n_sent - 1, (1,), generator=rng))
            other += other >= sentence
            i = int(torch.randint(max(length, 1), (1,), generator=rng))
            j = int(torch.randint(max(int(lengths[other]), 1), (1,), generator=rng))
            new_tokens[sentence, i], new_tokens[other, j] = tokens[other, j], tokens[sentence, i]
            source[sentence, i], source[other, j] = flat[other, j], flat[sentence, i]
        elif kind == "exchange_span":  # the same positions of two sentences trade places
            other = int(torch.randint(n_sent - 1, (1,), generator=rng))
            other += other >= sentence
            shared = max(1, min(length, int(lengths[other])))
            b, e = sorted(int(v) for v in torch.randint(shared + 1, (2,), generator=rng))
            e = max(e, b + 1)
            b = min(b, shared - 1)
            new_tokens[sentence, b:e] = tokens[other, b:e]
            new_tokens[other, b:e] = tokens[sentence, b:e]
            source[sentence, b:e] = flat[other, b:e]
            source[other, b:e] = flat[sentence, b:e]
        else:  # length
            others = torch.cat([lengths[:sentence], lengths[sentence + 1 :]])
            others_full = bool((others >= full).any())
            low = 1 if others_full else full
            new_lengths[sentence] = low + int(torch.randint(full - low + 1, (1,), generator=rng))
        out_tokens.append(new_tokens)
        out_lengths.append(new_lengths)
        out_source.append(source)
    return torch.stack(out_tokens), torch.stack(out_lengths), torch.stack(out_source)


def ranking_cost(
    distances: Tensor, nll: Tensor | None, weight: float, *, floor: float = CONVERGED
) -> Tensor:
    """How discrete candidates are ranked: ``max(distance, floor) * exp(weight * nll)``.

    LAMP ranks by gradient distance plus its weight times the language model's score. Here the
    sum is taken in log space (``log distance + weight * nll``, returned exponentiated so the
    cost stays a positive distance), so the prior trades a relative change of distance (one nat
    of mean per-token negative log-likelihood is worth a factor ``exp(weight)``) whatever the
    model's distance scale, and can never make a fluent sentence beat one that reproduces the
    update (distances below `floor` tie, and the prior breaks the tie).

    Args:
        distances: (K,) gradient distances.
        nll: (K,) the language model's mean negative log-likelihood per token, or None.
        weight: the prior's weight.
        floor: distances below it count as exact.

    Example:
        >>> d = torch.tensor([1e-3, 2e-3, 0.0])
        >>> ranking_cost(d, torch.tensor([5.0, 1.0, 9.0]), 0.2).argsort().tolist()
        [2, 1, 0]
    """
    costs = distances.to(torch.float64).clamp_min(floor)
    if nll is not None and weight:
        costs = costs * torch.exp(weight * nll.to(torch.float64))
    return costs


def missing_share(tokens: Tensor, lengths: Tensor, allowed: Tensor) -> Tensor:
    """For each of K candidate batches, the share of the `allowed` ids it never uses.

    Args:
        tokens: (K, N, L) ids.
        lengths: (K, N) sentence lengths (positions at or after them do not count).
        allowed: (A,) the ids the update shows present.

    Example:
        >>> share = missing_share(torch.tensor([[[5, 6, 5]], [[5, 7, 6]]]),
        ...                       torch.tensor([[3], [2]]), torch.tensor([5, 6, 7]))
        >>> [round(v, 4) for v in share.tolist()]  # 7 unused; 6 past the second's length
        [0.3333, 0.3333]
    """
    k = tokens.shape[0]
    keep = (torch.arange(tokens.shape[-1]) < lengths.unsqueeze(-1)).reshape(k, -1, 1)
    hit = (tokens.reshape(k, -1, 1) == allowed) & keep
    return 1.0 - hit.any(dim=1).to(torch.float64).mean(dim=1)


def in_use(tokens: Tensor, lengths: Tensor, pad_id: int) -> Tensor:
    """`tokens` with every position at or after its sentence's length set to `pad_id`.

    Example:
        >>> in_use(torch.tensor([[5, 6, 7], [8, 9, 4]]), torch.tensor([2, 3]), 0).tolist()
        [[5, 6, 0], [8, 9, 4]]
    """
    keep = torch.arange(tokens.shape[-1]) < lengths.unsqueeze(-1)
    return torch.where(keep, tokens, torch.full_like(tokens, pad_id))


def substitution_sweep(
    tokens: Tensor,
    lengths: Tensor,
    score: Score,
    pool: Tensor,
    *,
    deadline: float | None = None,
) -> tuple[Tensor, float]:
    """Coordinate descent over positions (ours): each position in turn takes the token of
    `pool` (its own included) that gives the lowest cost, the others held fixed.

    LAMP's moves rearrange tokens but never change which tokens a sentence holds; this sweep
    does, with the whole pool tried at every position, so a token used too often or too
    rarely (the embedding gradient shows which ids occur, not how often) is corrected
    wherever the cost says so. Stops early (after a whole position) once `deadline` (a
    ``time.perf_counter()`` value) passes.

    Returns:
        The swept tokens and their cost (inf when the deadline passed before any position).

    Example:
        >>> target = torch.tensor([[3, 1, 2]])
        >>> def score(t, _lengths):  # positions that differ from the target
        ...     return (t != target).sum(dim=(1, 2)).double()
        >>> swept, cost = substitution_sweep(torch.tensor([[1, 1, 1]]), torch.tensor([3]),
        ...                                  score, torch.tensor([1, 2, 3]))
        >>> swept.tolist(), cost
        ([[3, 1, 2]], 0.0)
    """
    n_sent = tokens.shape[0]
    cost = math.inf
    for n in range(n_sent):
        for position in range(int(lengths[n])):
            if deadline is not None and time.perf_counter() >= deadline:
                return tokens, cost
            candidates = tokens.expand(pool.numel() + 1, *tokens.shape).clone()
            candidates[1:, n, position] = pool
            costs = score(candidates, lengths.expand(pool.numel() + 1, n_sent))
            best = int(torch.argmin(costs))  # ties keep the current token
            tokens, cost = candidates[best], float(costs[best])
    return tokens, cost


def swap_sweep(
    tokens: Tensor, lengths: Tensor, score: Score, *, deadline: float | None = None
) -> tuple[Tensor, float]:
    """Every swap of two positions of a sentence, scored at once; each sentence in turn takes
    the best (ours: LAMP samples swaps among its moves, which can miss the one that fixes a
    sentence). Stops early (after a whole sentence) once `deadline` passes.

    Returns:
        The tokens after the sweep and their cost.

    Example:
        >>> target = torch.tensor([[3, 1, 2], [4, 5, 6]])
        >>> def score(t, _lengths):
        ...     return (t != target).sum(dim=(1, 2)).double()
        >>> swapped, cost = swap_sweep(torch.tensor([[2, 1, 3], [4, 6, 5]]),
        ...                            torch.tensor([3, 3]), score)
        >>> swapped.tolist(), cost
        ([[3, 1, 2], [4, 5, 6]], 0.0)
    """
    cost = math.inf
    for n in range(tokens.shape[0]):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        pairs = torch.combinations(torch.arange(int(lengths[n])), 2)
        tokens, cost = _best_exchange(tokens, lengths, score, (n, pairs[:, 0]), (n, pairs[:, 1]))
    return tokens, cost


def exchange_sweep(
    tokens: Tensor, lengths: Tensor, score: Score, *, deadline: float | None = None
) -> tuple[Tensor, float]:
    """Every exchange of a token of one sentence with a token of another, scored at once per
    pair of sentences; each pair in turn takes the best (ours: a token put in the wrong
    sentence needs two coordinated changes, which a one-position sweep cannot make).

    Stops early (after a whole pair) once `deadline` (a ``time.perf_counter()`` value) passes.

    Returns:
        The tokens after the sweep and their cost (inf with a single sentence).

    Example:
        >>> target = torch.tensor([[3, 1], [4, 5]])
        >>> def score(t, _lengths):
        ...     return (t != target).sum(dim=(1, 2)).double()
        >>> swapped, cost = exchange_sweep(torch.tensor([[3, 5], [4, 1]]), torch.tensor([2, 2]),
        ...                                score)
        >>> swapped.tolist(), cost
        ([[3, 1], [4, 5]], 0.0)
    """
    cost = math.inf
    for n, m in torch.combinations(torch.arange(tokens.shape[0]), 2).tolist():
        if deadline is not None and time.perf_counter() >= deadline:
            break
        pairs = torch.cartesian_prod(torch.arange(int(lengths[n])), torch.arange(int(lengths[m])))
        pairs = pairs.view(-1, 2)
        pairs = pairs[tokens[n, pairs[:, 0]] != tokens[m, pairs[:, 1]]]
        tokens, cost = _best_exchange(tokens, lengths, score, (n, pairs[:, 0]), (m, pairs[:, 1]))
    return tokens, cost


def _best_exchange(
    tokens: Tensor,
    lengths: Tensor,
    score: Score,
    first: tuple[int, Tensor],
    second: tuple[int, Tensor],
) -> tuple[Tensor, float]:
    """The batch itself and, for each k, the batch with the token at ``(first[0],
    first[1][k])`` and the one at ``(second[0], second[1][k])`` exchanged, scored at once; the
    cheapest of them (ties keep the batch) and its cost."""
    (n, a), (m, b) = first, second
    candidates = tokens.expand(a.shape[0] + 1, *tokens.shape).clone()
    rows = torch.arange(1, a.shape[0] + 1)
    candidates[rows, n, a] = tokens[m, b]
    candidates[rows, m, b] = tokens[n, a]
    costs = score(candidates, lengths.expand(a.shape[0] + 1, tokens.shape[0]))
    best = int(torch.argmin(costs))
    return candidates[best], float(costs[best])


def discrete_step(
    tokens: Tensor,
    lengths: Tensor,
    score: Score,
    *,
    candidates: int,
    rng: torch.Generator,
    pool: Tensor | None = None,
    full_length: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, float]:
    """LAMP's discrete step: for each sentence in turn, score `candidates` variants of the
    batch that change only that sentence (:func:`rearrangements`) and keep the best.

    Args:
        tokens: (N, L) the current token ids.
        lengths: (N,) the current lengths.
        score: the cost of candidate batches (gradient distance plus the prior's weight times
            the language model's score, in LAMP).
        candidates: variants per sentence, the unchanged one included (LAMP: 200).
        rng: the random stream.
        pool: token ids replacements may use (None: rearrangements only).
        full_length: the longest length a sentence may take (None: lengths stay).

    Returns:
        ``(tokens, lengths, source, cost)``: the chosen batch, the flat source index of each of
        its positions in the input batch (see :func:`rearrangements`) and its cost.
    """
    n_sent, width = tokens.shape
    source = torch.arange(n_sent * width).view(n_sent, width)
    cost = math.inf
    for sentence in range(n_sent):
        cand_tokens, cand_lengths, cand_source = rearrangements(
            tokens, lengths, sentence, candidates, rng, pool=pool, full_length=full_length
        )
        costs = score(cand_tokens, cand_lengths)
        best = int(torch.argmin(costs))  # ties keep the unchanged batch (index 0)
        tokens, lengths = cand_tokens[best], cand_lengths[best]
        source = source.flatten()[cand_source[best]]
        cost = float(costs[best])
    return tokens, lengths, source, cost


# --------------------------------------------------------------------------- the matcher


class _Embedded(nn.Module):
    """Calls ``inner.forward_embeddings`` as its forward, for ``torch.func.functional_call``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, embeddings: Tensor, keep: Tensor) -> Tensor:
        return self.inner.forward_embeddings(embeddings, keep)  # type: ignore[operator]


@dataclass(frozen=True)
class TokenMatcher:
    """Gradient matching for a model with ``embed`` and ``forward_embeddings`` (a token
    embedding whose output the rest of the model takes, like `models.transformer`).

    Continuous candidates (embeddings) are compared on every sent parameter but the token
    embedding (whose gradient needs a lookup), with `loss`; discrete candidates (token ids)
    are compared on those and on the token-embedding rows of the allowed ids, many at once
    with ``torch.func.vmap``, with `rank_loss` (the cosine by default: it is scale-free, so a
    language prior's weight means the same on any model).

    Attributes:
        model: the attacker's copy of the global model.
        token_key: the parameter name of its token embedding.
        labels: the labels of the candidate sentences.
        names: the parameters compared (sent by the client), token embedding excluded.
        target: the observed gradient of each of `names`.
        allowed: the token ids a sentence may hold, ascending.
        table: their embedding rows (K, D).
        table_target: the observed gradient of those rows, or None (token embedding withheld).
        loss: the gradient distance of continuous candidates.
        alpha: TAG's L1 weight.
        rank_loss: the gradient distance of discrete candidates.
        chunk: discrete candidates evaluated per vectorised call.
    """

    model: nn.Module
    token_key: str
    labels: Tensor
    names: tuple[str, ...]
    target: tuple[Tensor, ...]
    allowed: Tensor
    table: Tensor
    table_target: Tensor | None
    loss: MatchLoss = "cosine"
    alpha: float = TAG_ALPHA
    rank_loss: MatchLoss = "cosine"
    chunk: int = 64

    def continuous(self, embeddings: Tensor, keep: Tensor, *, create_graph: bool = True) -> Tensor:
        """The distance for token embeddings (N, L, D), differentiable in them."""
        params = dict(self.model.named_parameters())
        logits = self.model.forward_embeddings(embeddings, keep)  # type: ignore[operator]
        return gradient_matching_loss(
            logits,
            self.labels,
            [params[n] for n in self.names],
            self.target,
            loss=self.loss,
            alpha=self.alpha,
            create_graph=create_graph,
        )

    def rows(self, tokens: Tensor) -> Tensor:
        """The row of each token id in `table` (an id outside `allowed` gets a neighbour's)."""
        rows = torch.searchsorted(self.allowed, tokens.clamp_min(0))
        return rows.clamp_max(self.allowed.numel() - 1)

    @cached_property
    def _sentence_gradients(self) -> Callable[[Tensor, Tensor, Tensor], list[Tensor]]:
        """``f(rows (S, L), keep (S, L), labels (S,))``: each sentence's own gradient of its
        cross-entropy, for every compared tensor (and the allowed token rows last), (S, ...).
        Built once per matcher: every discrete step and sweep calls it."""
        wrapper = _Embedded(self.model)
        params = {n: p.detach() for n, p in self.model.named_parameters() if n != self.token_key}
        fixed = {f"inner.{n}": p for n, p in params.items() if n not in self.names}
        moving = {f"inner.{n}": params[n] for n in self.names}

        def ce(
            p: dict[str, Tensor], table: Tensor, rows: Tensor, keep: Tensor, y: Tensor
        ) -> Tensor:
            embeddings = table[rows].unsqueeze(0)
            logits = functional_call(wrapper, {**fixed, **p}, (embeddings, keep.unsqueeze(0)))
            return nn.functional.cross_entropy(logits, y.unsqueeze(0))

        per_sentence = vmap(grad(ce, argnums=(0, 1)), in_dims=(None, None, 0, 0, 0))

        def gradients(rows: Tensor, keep: Tensor, labels: Tensor) -> list[Tensor]:
            g_params, g_table = per_sentence(moving, self.table, rows, keep, labels)
            out = [g_params[f"inner.{n}"].detach() for n in self.names]
            if self.table_target is not None:
                out.append(g_table.detach())
            return out

        return gradients

    def _targets(self) -> list[Tensor]:
        return list(self.target) + ([self.table_target] if self.table_target is not None else [])

    def distances(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """The gradient distance of each of K candidate batches: tokens (K, N, L), lengths
        (K, N); float64 (K,).

        The client's gradient is the mean of its sentences' own gradients (the cross-entropy is
        averaged and the model has no batch statistics), so each distinct sentence among the
        candidates is differentiated once and the batches' gradients are means of those: a
        step that changes one sentence costs one sentence's gradient per candidate.
        """
        k, n, width = tokens.shape
        rows = self.rows(tokens).reshape(k * n, width)
        labels = self.labels.repeat(k)
        key = torch.cat([rows, lengths.reshape(-1, 1), labels.reshape(-1, 1)], dim=1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        keep = torch.arange(width) < unique[:, width : width + 1]
        gradients = self._sentence_gradients
        parts = [
            gradients(
                unique[i : i + self.chunk, :width],
                keep[i : i + self.chunk],
                unique[i : i + self.chunk, -1],
            )
            for i in range(0, unique.shape[0], self.chunk)
        ]
        per_sentence = [torch.cat(tensors) for tensors in zip(*parts, strict=True)]
        inverse = inverse.view(k, n)
        targets = self._targets()

        def distance(*grads: Tensor) -> Tensor:
            return gradient_distance(grads, targets, loss=self.rank_loss, alpha=self.alpha)

        batched = vmap(distance)
        out = []
        step = max(1, self.chunk // n)
        for i in range(0, k, step):
            index = inverse[i : i + step]
            out.append(batched(*[g[index].mean(dim=1) for g in per_sentence]))
        return torch.cat(out).to(torch.float64)

    def sentence_gradients(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Each sentence's own flattened gradient over the compared tensors (the allowed token
        rows included), (N, P), and the observed gradient flattened alike, (P,)."""
        keep = torch.arange(tokens.shape[-1]) < lengths.unsqueeze(-1)
        grads = self._sentence_gradients(self.rows(tokens), keep, self.labels)
        per_sentence = torch.cat([g.flatten(1) for g in grads], dim=1)
        return per_sentence, torch.cat([t.flatten() for t in self._targets()])


# --------------------------------------------------------------------------- the attack


Relaxation = Literal["softmax", "embeddings"]


class TextInversionParams(BaseModel):
    """Parameters of `text_inversion` (LAMP's settings where it has one, in parentheses)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    iterations: int = Field(
        500, ge=1, description="continuous Adam steps per restart (LAMP: 2000; TAG: 2500)"
    )
    restarts: int = Field(
        1,
        ge=1,
        description="continuous runs from new random starts; the best candidate of all is "
        "polished (a run that explains the update exactly ends the search)",
    )
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="wall-clock budget: the restarts share continuous_share of it, the discrete "
        "polish has the rest (training the language model is counted)",
    )
    continuous_share: float = Field(
        0.7, gt=0, lt=1, description="share of max_seconds for the continuous runs"
    )
    relaxation: Relaxation = Field(
        "embeddings",
        description="what the continuous phase optimises: embeddings (TAG/LAMP: free token "
        "embeddings, projected to the nearest allowed token) or softmax (ours: a distribution "
        "over the allowed tokens per position, whose expected embedding enters the model)",
    )
    loss: MatchLoss = Field(
        "tag",
        description="gradient distance of the continuous phase: tag (TAG: L2 + tag_alpha * L1) "
        "or cosine (LAMP: mean 1 - cos per tensor)",
    )
    rank_loss: MatchLoss = Field(
        "cosine",
        description="gradient distance that ranks discrete candidates (with the prior): cosine "
        "(scale-free, so prior_weight means the same on any model) or tag",
    )
    tag_alpha: float = Field(TAG_ALPHA, ge=0, description="TAG's L1 weight (LAMP's TAG: 0.01)")
    lr: float = Field(
        0.1, gt=0, description="Adam step size (LAMP's tuned TAG: 0.1; LAMP cosine: 0.01)"
    )
    lr_final: float = Field(
        1.0,
        gt=0,
        le=1,
        description="the step size at the end of a run as a share of lr, reached exponentially "
        "(LAMP's TAG: 1, constant; LAMP cosine: 0.89 every 50 of 2000 steps, about 0.01)",
    )
    reg_weight: float = Field(
        1.0,
        ge=0,
        description="embeddings relaxation: weight of LAMP's (mean embedding norm - mean token "
        "norm)^2 regulariser (LAMP cosine: 1)",
    )
    prior_weight: float = Field(
        0.2,
        ge=0,
        description="weight of the language model's mean negative log-likelihood per token "
        "against the log gradient distance when ranking discrete candidates (ranking_cost; "
        "LAMP cosine: 0.2 against the distance itself); 0 disables the prior",
    )
    coverage_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the share of the update's words a candidate leaves out, against "
        "the log gradient distance when ranking discrete candidates (every word whose "
        "embedding row has a gradient occurs somewhere in the batch); 0 disables it",
    )
    lm_order: int = Field(3, ge=1, le=5, description="n of the n-gram prior")
    discrete_every: int = Field(
        75, ge=1, description="continuous steps between discrete steps (LAMP: 75)"
    )
    discrete_burnin: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="share of a run's steps before its first discrete step (LAMP: 0.1)",
    )
    candidates: int = Field(
        200, ge=1, description="candidates per sentence in a discrete step (LAMP: 200)"
    )
    polish_rounds: int = Field(
        20,
        ge=0,
        description="rounds after the continuous runs, each a substitution sweep (every allowed "
        "token tried at every position), a swap sweep (every pair of positions of a sentence), "
        "an exchange sweep (every pair of positions of two sentences) and a discrete step",
    )
    patience: int = Field(
        2, ge=1, description="polish rounds without improvement before the polish stops"
    )
    length_search: bool = Field(
        False,
        description="let the polish change each sentence's length (one keeps the longest); off: "
        "every sentence has the longest length the position-embedding gradient shows",
    )
    init: Literal["auto", "positions", "random"] = Field(
        "auto",
        description="positions: one sequence's tokens in order from the position-embedding "
        "gradient (text_tokens' assignment; else random); random: random starts only; auto: "
        "positions for the first run",
    )
    init_candidates: int = Field(
        16,
        ge=1,
        description="random starts scored by gradient distance per run, the best kept (LAMP: 500)",
    )
    token_rtol: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="token-embedding rows above this share of the largest norm count as "
        "present (0: the exact test; raise under noise)",
    )
    label_method: LabelMethod = Field("auto", description="label recovery when labels are unknown")
    max_sequences: int = Field(16, ge=1, description="refuse updates computed on more sequences")


@dataclass(frozen=True)
class _State:
    """A discrete candidate: token ids (N, L) and lengths (N,)."""

    tokens: Tensor
    lengths: Tensor


class TextInversionAttack(Reconstructs):
    """Recover the target's token sequences, order included, by gradient matching with a
    language-model prior.

    1. Facts from the update: the batch's token set (the non-zero rows of the token-embedding
       gradient), the longest sequence's length (the non-zero rows of the position-embedding
       gradient) and the labels (granted, or recovered by `label_recovery`).
    2. Continuous runs (TAG): Adam on a relaxed batch against the gradient distance on every
       sent parameter but the token embedding: ``tag`` (TAG's L2 + alpha·L1, the default, with
       LAMP's tuned TAG step size) or ``cosine`` (LAMP). ``embeddings`` relaxes each position
       to a free embedding, regularised towards the tokens' mean norm (LAMP) and projected to
       the nearest allowed token by cosine; ``softmax`` (ours) relaxes it to a distribution
       over the allowed tokens whose expected embedding enters the model (TabLeak's relaxation
       of categorical features, Vero et al., ICML 2023, applied to tokens). Every
       `discrete_every` steps LAMP's discrete step rearranges each projected sentence (swap,
       move a token, move a span, rotate) and the relaxed variables follow the chosen move.
    3. Polish (ours): rounds of sweeps on the best candidate — every allowed token at every
       position (`substitution_sweep`), every swap within a sentence (`swap_sweep`), every
       exchange of tokens between two sentences (`exchange_sweep`) — and a LAMP discrete step
       with replacements and exchanges among its moves, until `patience` rounds bring nothing.

    Discrete candidates are ranked by their full gradient distance (`rank_loss`, cosine by
    default, token-embedding rows included: a discrete candidate defines them) combined with
    the prior (`ranking_cost`: LAMP's distance + weight·NLL, taken in log space so the weight
    is scale-free and a fluent sentence never beats one that reproduces the update), and, with
    ``coverage_weight`` (ours, off by default), by the share of the update's words a candidate
    leaves out (`missing_share`: each of them occurs somewhere in the batch). The best
    candidate ever scored is returned; one whose distance is below `CONVERGED` explains the
    update and ends the search. Each sentence's confidence is the leave-one-out cosine of its
    gradient with the update (`sentence_confidence`).

    Per-sequence lengths: the gradient shows only the longest, so every sentence gets it (the
    MedQuAD and MTSamples sequences nearly all fill their length: 99.8 % of MedQuAD's training
    sequences do); with ``length_search`` the polish treats lengths as discrete variables too,
    one sentence keeping the longest.

    The prior is an interpolated Kneser-Ney n-gram model (`language.train_ngram_model`)
    counted from ``side_info["public_data"]`` when the threat model grants it; without public
    data the attack runs without a prior and says so. With ``init=auto`` a single sequence
    starts from the order the position-embedding gradient gives
    (`tokens.position_assignment`), which on an exact gradient is the answer.

    Balunović, Dimitrov, Jovanović & Vechev, NeurIPS 2022 (LAMP); Deng et al., Findings of
    EMNLP 2021 (TAG).
    Threat model: an honest-but-curious server that sees the individual update and knows the
    architecture and the public vocabulary.
    """

    name: ClassVar[str] = "text_inversion"

    def __init__(self, params: TextInversionParams) -> None:
        self.params = params

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        limit = ("max_sequences", self.params.max_sequences)
        return checked_update(obs, attack=self.name, modality="text", limit=limit)

    def _target(self, obs: Observation, model: nn.Module) -> tuple[ClientUpdate, str] | str:
        """The update and the token embedding's key, or the reason the attack cannot run: it
        needs a text task, the target's individual update, the architecture, few enough
        sequences, a model that takes token embeddings and labels it can use."""
        update, reason = self._update(obs)
        if update is None:
            return str(reason)
        assert obs.task.text is not None
        key = token_embedding_key(model, obs.task.text)
        if key is None or not callable(getattr(model, "forward_embeddings", None)):
            return (
                "the model does not take token embeddings (it needs a single token embedding and "
                "forward_embeddings, as models.transformer has)"
            )
        reason = unknown_labels_reason(obs, update, model)
        if reason is not None:
            return reason
        return update, key

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Reconstruct the target's sentences."""
        found = self._target(obs, model)
        if isinstance(found, str):
            return not_applicable(self.name, obs, found)
        update, token_key = found
        started = time.perf_counter()
        p = self.params
        schema = obs.task.text
        assert schema is not None
        count = update.num_examples
        labels, label_source = labels_for_inversion(
            obs, model, count=count, method=p.label_method, rng=rng, train_mode=False
        )
        grads, grad_source = gradient_estimate(update, obs)
        details: dict[str, object] = {"labels": label_source, "gradient": grad_source}
        if update.kind == "delta":
            details["note"] = "the FedAvg model change is matched as one gradient"
        allowed, length, position_key = self._token_facts(model, schema, grads, token_key, details)
        if allowed.numel() == 0:
            return AttackResult(
                self.name,
                obs.round,
                obs.target_client,
                "failed",
                reason="the token-embedding gradient shows no token",
                seconds=time.perf_counter() - started,
            )
        prior, details["prior"] = public_prior(obs, schema, order=p.lm_order, weight=p.prior_weight)
        attacker = attacker_model(model, obs)
        matcher = token_matcher(
            attacker,
            grads,
            token_key,
            allowed,
            labels,
            loss=p.loss,
            alpha=p.tag_alpha,
            rank_loss=p.rank_loss,
        )
        search = BestSoFar(
            started=started,
            total=p.iterations * p.restarts + 2 * p.polish_rounds,
            to_pixels=lambda z: z,
            max_seconds=p.max_seconds,
            progress=progress,
        )
        problem = _Search(matcher, prior, p, schema.pad_id, length, search)
        first = self._initial(grads, token_key, position_key, allowed, length, count, details)
        deadline = started + p.max_seconds if p.max_seconds else None
        state = problem.run(first, count, rng, started, deadline, details)
        out = torch.full((count, schema.max_length), schema.pad_id, dtype=torch.long)
        out[:, :length] = in_use(state.tokens, state.lengths, schema.pad_id)
        # a cosine distance can come out a few ulps below zero; report it as the 0 it is
        distance = max(0.0, float(matcher.distances(state.tokens[None], state.lengths[None])[0]))
        details.update(
            {
                "sentences": [schema.decode(row) for row in out],
                "objective": search.lowest,
                "gradient_distance": distance,
                "iterations_run": search.done,
                "recipe": p.model_dump(),
            }
        )
        if p.length_search:
            details["lengths"] = state.lengths.tolist()
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(
                tokens=out,
                labels=labels,
                confidence=sentence_confidence(matcher, state.tokens, state.lengths),
            ),
            seconds=time.perf_counter() - started,
            details=details,
            trace=tuple(search.trace),
        )

    def _token_facts(
        self,
        model: nn.Module,
        schema: TextSchema,
        grads: dict[str, Tensor],
        token_key: str,
        details: dict[str, object],
    ) -> tuple[Tensor, int, str | None]:
        """The allowed token ids, the longest sequence's length and the position embedding's
        key when its gradient was sent."""
        if token_key in grads:
            allowed = looked_up_rows(grads[token_key], rtol=self.params.token_rtol)
            details["token_set"] = "the non-zero rows of the token-embedding gradient"
        else:
            allowed = torch.arange(schema.vocab_size)
            details["token_set"] = "the whole vocabulary (the token embedding was withheld)"
        allowed = allowed[allowed != schema.pad_id]
        details["token_set_size"] = int(allowed.numel())
        length = schema.max_length
        position_key = position_embedding_key(model, schema, token_key)
        if position_key is not None and position_key in grads:
            used = looked_up_rows(grads[position_key], rtol=self.params.token_rtol)
            if used.numel():
                length = int(used.max()) + 1
            details["length_source"] = "the non-zero rows of the position-embedding gradient"
        else:
            position_key = None
            details["length_source"] = "the maximum length (no position-embedding gradient)"
        details["longest_sequence"] = length
        return allowed, length, position_key

    def _initial(
        self,
        grads: dict[str, Tensor],
        token_key: str,
        position_key: str | None,
        allowed: Tensor,
        length: int,
        count: int,
        details: dict[str, object],
    ) -> _State | None:
        """The first run's start from the position-embedding gradient, or None (random)."""
        if self.params.init == "random":
            details["init"] = "random"
            return None
        if count != 1 or position_key is None or token_key not in grads:
            details["init"] = "random (positions needs one sequence and both embedding gradients)"
            return None
        found = position_assignment(grads[token_key][allowed], grads[position_key][:length])
        if found.owner is None:
            details["init"] = (
                f"random (no exact position assignment; residual {found.residual:.3g})"
            )
            return None
        details["init"] = f"positions (assignment residual {found.residual:.3g})"
        return _State(allowed[found.owner].unsqueeze(0), torch.tensor([length]))


def token_matcher(
    model: nn.Module,
    grads: dict[str, Tensor],
    token_key: str,
    allowed: Tensor,
    labels: Tensor,
    *,
    loss: MatchLoss = "cosine",
    alpha: float = TAG_ALPHA,
    rank_loss: MatchLoss = "cosine",
) -> TokenMatcher:
    """The `TokenMatcher` of an attacker's model copy against the observed gradient `grads`
    (only the parameters present in `grads`, those the client sent, are compared)."""
    model.eval()
    names = tuple(n for n, _ in model.named_parameters() if n in grads and n != token_key)
    return TokenMatcher(
        model=model,
        token_key=token_key,
        labels=labels,
        names=names,
        target=tuple(grads[n].detach() for n in names),
        allowed=allowed,
        table=model.get_parameter(token_key)[allowed].detach(),
        table_target=grads[token_key][allowed].detach() if token_key in grads else None,
        loss=loss,
        alpha=alpha,
        rank_loss=rank_loss,
    )


def sentence_confidence(
    matcher: TokenMatcher, tokens: Tensor, lengths: Tensor, *, fit_scale: bool = False
) -> Tensor:
    """The attacker's confidence in each reconstructed sentence: the cosine of its own
    gradient with the part of the observed one the other sentences leave unexplained
    (`validation.leave_one_out_cosines`; for one sentence, its gradient's cosine with the
    update). 1 for the true batch; float64 (N,)."""
    per_sentence, target = matcher.sentence_gradients(tokens, lengths)
    return leave_one_out_cosines(per_sentence, target, fit_scale=fit_scale)


@dataclass
class _Search:
    """One attack's search: continuous runs with discrete steps, then the polish."""

    matcher: TokenMatcher
    prior: NGramLanguageModel | None
    params: TextInversionParams
    pad_id: int
    length: int
    search: BestSoFar
    best_distance: float = math.inf
    last: tuple[bytes, float, float] = (b"", math.inf, math.inf)

    @property
    def floor(self) -> float:
        """The distance below which a discrete candidate explains the update."""
        if self.matcher.rank_loss == "cosine":
            return CONVERGED
        return CONVERGED * float(sum(t.pow(2).sum() for t in self.matcher.target))

    def evaluate(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The ranking cost (`ranking_cost`) and the gradient distance of K candidates."""
        distances = self.matcher.distances(tokens, lengths)
        nll = None
        if self.prior is not None:
            k, n, width = tokens.shape
            nll = self.prior.nll(in_use(tokens, lengths, self.pad_id).view(k * n, width))
            nll = nll.view(k, n).mean(dim=1)
        costs = ranking_cost(distances, nll, self.params.prior_weight, floor=self.floor)
        if self.params.coverage_weight and self.matcher.table_target is not None:
            missing = missing_share(tokens, lengths, self.matcher.allowed)
            costs = costs * torch.exp(self.params.coverage_weight * missing)
        return costs, distances

    def cost(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        """The ranking cost of K candidates, (K,)."""
        return self.evaluate(tokens, lengths)[0]

    def offer(self, state: _State, *, final: bool = False) -> bool:
        """Score a candidate and record it; True when it explains the update."""
        packed = torch.cat([state.tokens, state.lengths[:, None]], dim=1)
        key = packed.numpy().tobytes()
        if key == self.last[0]:  # the projection did not change: no need to score it again
            distance, cost = self.last[1], self.last[2]
        else:
            costs, distances = self.evaluate(state.tokens[None], state.lengths[None])
            cost, distance = float(costs[0]), float(distances[0])
            self.last = (key, distance, cost)
        self.search.offer(packed, cost, final=final)
        self.best_distance = min(self.best_distance, distance)
        return distance < self.floor

    def best(self) -> _State:
        packed, _ = self.search.best()
        return _State(packed[:, :-1].clone(), packed[:, -1].clone())

    def run(
        self,
        first: _State | None,
        count: int,
        rng: torch.Generator,
        started: float,
        deadline: float | None,
        details: dict[str, object],
    ) -> _State:
        p = self.params
        continuous_deadline = (
            None if deadline is None else started + (deadline - started) * p.continuous_share
        )
        done = False
        steps: list[int] = []
        for restart in range(p.restarts):
            clock = Clock.start(p.iterations, continuous_deadline, p.restarts - restart)
            start = first if restart == 0 else None
            run_steps, done = self._continuous(start, count, rng, clock)
            steps.append(run_steps)
            logger.info(
                "text_inversion run %d: %d steps, lowest distance %.3g",
                restart,
                run_steps,
                self.best_distance,
            )
            if done or (clock.budget is not None and time.perf_counter() >= continuous_deadline):
                break
        details["continuous_steps"] = steps
        rounds = 0
        if not done:
            rounds, done = self._polish(rng, deadline)
        details["polish_rounds"] = rounds
        details["explains_update"] = done
        logger.info(
            "text_inversion polish: %d rounds, lowest distance %.3g", rounds, self.best_distance
        )
        return self.best()

    def _continuous(
        self, start: _State | None, count: int, rng: torch.Generator, clock: Clock
    ) -> tuple[int, bool]:
        """One continuous run with LAMP's discrete steps; returns its steps and whether a
        candidate explained the update."""
        p = self.params
        relax = _Relaxed.start(self, start, count, rng)
        lengths = start.lengths.clone() if start is not None else torch.full((count,), self.length)
        if self.offer(_State(relax.project(), lengths)):
            return 0, True
        lr = p.lr
        optimiser = torch.optim.Adam([relax.variable], lr=lr)
        first_discrete = max(1, int(p.discrete_burnin * p.iterations))
        keep = torch.arange(self.length) < lengths.unsqueeze(1)
        step = 0
        while step < p.iterations:
            for group in optimiser.param_groups:
                group["lr"] = lr * p.lr_final ** min(1.0, clock.fraction(step))
            objective = relax.objective(keep)
            (relax.variable.grad,) = torch.autograd.grad(objective, [relax.variable])
            optimiser.step()
            step += 1
            tokens = relax.project()
            if step >= first_discrete and step % p.discrete_every == 0:
                tokens, lengths, source, _ = discrete_step(
                    tokens, lengths, self.cost, candidates=p.candidates, rng=rng
                )
                relax.follow(source)
            out_of_time = clock.out_of_time()
            if self.offer(_State(tokens, lengths), final=out_of_time):
                return step, True
            if out_of_time:
                break
        return step, False

    def _polish(self, rng: torch.Generator, deadline: float | None) -> tuple[int, bool]:
        """Rounds of the substitution, swap and exchange sweeps and a discrete step (with
        replacements and exchanges) from the best candidate; returns the rounds and whether a
        candidate explained the update."""
        p = self.params
        state = self.best()
        rounds = stale = 0
        _, lowest = self.search.best()
        while rounds < p.polish_rounds and stale < p.patience:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            tokens = state.tokens
            if self.matcher.allowed.numel() <= MAX_SWEEP_POOL:
                tokens, _ = substitution_sweep(
                    tokens, state.lengths, self.cost, self.matcher.allowed, deadline=deadline
                )
            tokens, _ = swap_sweep(tokens, state.lengths, self.cost, deadline=deadline)
            tokens, _ = exchange_sweep(tokens, state.lengths, self.cost, deadline=deadline)
            if self.offer(_State(tokens, state.lengths)):
                return rounds + 1, True
            tokens, lengths, _, cost = discrete_step(
                tokens,
                state.lengths,
                self.cost,
                candidates=p.candidates,
                rng=rng,
                pool=self.matcher.allowed,
                full_length=self.length if p.length_search else None,
            )
            rounds += 1
            state = _State(tokens, lengths)
            if self.offer(state, final=rounds == p.polish_rounds):
                return rounds, True
            stale = stale + 1 if cost >= lowest - 1e-12 else 0
            lowest = min(lowest, cost)
        return rounds, False


@dataclass
class _Relaxed:
    """The continuous variable of one run and how it maps to embeddings and tokens."""

    search: _Search
    variable: Tensor
    scale: float

    @classmethod
    def start(
        cls, search: _Search, start: _State | None, count: int, rng: torch.Generator
    ) -> _Relaxed:
        """From `start`'s tokens, else the best of `init_candidates` random draws (LAMP)."""
        matcher, p = search.matcher, search.params
        table = matcher.table
        scale = float(table.norm(dim=1).mean())
        k, dim = table.shape
        if start is not None:
            rows = matcher.rows(start.tokens)
            if p.relaxation == "softmax":
                variable = 10.0 * nn.functional.one_hot(rows, k).to(table.dtype)
            else:
                variable = table[rows].clone()
            return cls(search, variable.requires_grad_(True), scale)
        keep = torch.ones(count, search.length, dtype=torch.bool)
        best, lowest = None, math.inf
        for _ in range(p.init_candidates):
            if p.relaxation == "softmax":
                draw = torch.randn((count, search.length, k), generator=rng)
            else:
                draw = torch.randn((count, search.length, dim), generator=rng)
                draw = draw / draw.norm(dim=-1, keepdim=True) * scale
            relaxed = cls(search, draw, scale)
            with torch.enable_grad():
                cost = float(matcher.continuous(relaxed.embeddings(), keep, create_graph=False))
            if cost < lowest:
                best, lowest = draw, cost
        assert best is not None
        return cls(search, best.clone().requires_grad_(True), scale)

    def embeddings(self) -> Tensor:
        if self.search.params.relaxation == "softmax":
            return torch.softmax(self.variable, dim=-1) @ self.search.matcher.table
        return self.variable

    def objective(self, keep: Tensor) -> Tensor:
        p = self.search.params
        objective = self.search.matcher.continuous(self.embeddings(), keep)
        if p.relaxation == "embeddings" and p.reg_weight:
            norms = self.variable.norm(dim=-1)[keep]
            objective = objective + p.reg_weight * (norms.mean() - self.scale) ** 2
        return objective

    def project(self) -> Tensor:
        matcher = self.search.matcher
        if self.search.params.relaxation == "softmax":
            return matcher.allowed[self.variable.detach().argmax(dim=-1)]
        return matcher.allowed[nearest_tokens(self.variable.detach(), matcher.table)]

    def follow(self, source: Tensor) -> None:
        """Move the variable's positions as a discrete step moved the tokens."""
        with torch.no_grad():
            flat = self.variable.data.flatten(0, 1)
            self.variable.data = flat[source.flatten()].view_as(self.variable)
