"""A language-model prior over token sequences, trained on the adversary's public text.

LAMP (Balunović, Dimitrov, Jovanović & Vechev, "LAMP: Extracting Text from Gradients with
Language Model Priors", NeurIPS 2022) ranks candidate sentences by their gradient distance plus
a language model's perplexity (GPT-2 in the paper). An auditing adversary here has no
pretrained model of the federation's vocabulary; it has the public text the threat model grants
(``side_info["public_data"]``: held-out sequences of the same task, in the same token ids), and
trains a small model on it.

The model is an interpolated Kneser–Ney n-gram model (Kneser & Ney, "Improved backing-off for
M-gram language modeling", ICASSP 1995; the interpolated form of Chen & Goodman, "An Empirical
Study of Smoothing Techniques for Language Modeling", 1998, section 3): counting is
deterministic, training takes milliseconds, and every id of the vocabulary keeps a non-zero
probability, so a sentence with words never seen in public text is penalised, not ruled out.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradaudit.types import Observation, TextSchema

DISCOUNT = 0.75
"""Kneser–Ney's absolute discount (Chen & Goodman's usual single value)."""


@dataclass(frozen=True)
class _Level:
    """The counts of one order: per context, the (continuation) count of each next token."""

    counts: dict[tuple[int, ...], Counter[int]]
    totals: dict[tuple[int, ...], int]
    distinct: dict[tuple[int, ...], int]


def _level(counts: dict[tuple[int, ...], Counter[int]]) -> _Level:
    return _Level(
        counts=counts,
        totals={h: c.total() for h, c in counts.items()},
        distinct={h: len(c) for h, c in counts.items()},
    )


@dataclass(frozen=True)
class NGramLanguageModel:
    """An interpolated Kneser–Ney n-gram model over token ids ``0 .. vocab_size - 1``.

    Sequences start with ``order - 1`` begin-of-sequence symbols; a sequence that ends before
    the model's input length (it was padded) also predicts an end-of-sequence symbol, while a
    truncated one does not (its text goes on). Padding ids are never predicted.

    Build one with :func:`train_ngram_model`.

    Attributes:
        order: n, the longest n-gram.
        vocab_size: ids the model predicts (plus the end symbol).
        pad_id: the padding id (dropped from sequences).
        discount: the absolute discount D.
        sequences: how many public sequences it was trained on.
        tokens: how many tokens they held.
    """

    order: int
    vocab_size: int
    pad_id: int
    discount: float
    sequences: int
    tokens: int
    _levels: tuple[_Level, ...] = field(repr=False)
    _memo: dict[tuple[int, ...], float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def bos(self) -> int:
        """The begin-of-sequence symbol (context only)."""
        return self.vocab_size + 1

    @property
    def eos(self) -> int:
        """The end-of-sequence symbol."""
        return self.vocab_size

    def probability(self, token: int, history: Sequence[int]) -> float:
        """P(token | the last ``order - 1`` ids of history), history padded with begin symbols.

        Example:
            >>> lm = train_ngram_model(torch.tensor([[2, 3, 4, 0], [2, 3, 5, 0]]), 6, order=2)
            >>> round(sum(lm.probability(t, [3]) for t in [*range(1, 6), lm.eos]), 10)
            1.0
        """
        context = tuple(history[len(history) - (self.order - 1) :]) if self.order > 1 else ()
        context = (self.bos,) * (self.order - 1 - len(context)) + context
        return self._interpolated(int(token), context)

    def _interpolated(self, token: int, context: tuple[int, ...]) -> float:
        key = (*context, token)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        # lowest level: continuation unigrams interpolated with the uniform distribution
        predictable = self.vocab_size  # every id but padding, plus the end symbol
        p = 1.0 / predictable
        for k in range(len(context) + 1):
            level = self._levels[k]
            h = context[len(context) - k :]
            total = level.totals.get(h, 0)
            if total == 0:
                continue  # unseen context: back off entirely
            seen = level.counts[h].get(token, 0)
            p = (
                max(seen - self.discount, 0.0) / total
                + self.discount * level.distinct[h] / total * p
            )
        self._memo[key] = p
        return p

    def sequence_nll(self, ids: Sequence[int], *, ended: bool) -> float:
        """Mean negative log-likelihood (nats per predicted symbol) of one sequence of ids
        (padding already removed); `ended` adds the end symbol's prediction."""
        symbols = [self.bos] * (self.order - 1) + [int(i) for i in ids]
        targets = len(ids) + 1 if ended else len(ids)
        if ended:
            symbols.append(self.eos)
        if not targets:
            return 0.0
        n = self.order - 1
        total = sum(
            -math.log(self._interpolated(symbols[i], tuple(symbols[i - n : i])))
            for i in range(n, len(symbols))
        )
        return total / targets

    def nll(self, tokens: Tensor) -> Tensor:
        """Mean negative log-likelihood per sequence of `tokens` (N, L), float64 (N,).

        Padding ids are dropped; a sequence with padding counts as ended (it predicts the end
        symbol), a full one as truncated. The perplexity LAMP ranks by is ``exp`` of it.

        Example:
            >>> corpus = torch.tensor([[2, 3, 4, 5, 0], [2, 3, 4, 6, 0], [2, 3, 5, 0, 0]])
            >>> lm = train_ngram_model(corpus, 7)
            >>> nll = lm.nll(torch.tensor([[2, 3, 4, 5, 0], [5, 4, 3, 2, 0]]))
            >>> bool(nll[0] < nll[1])
            True
        """
        rows = tokens.long().tolist()
        width = tokens.shape[1]
        out = []
        for row in rows:
            ids = [t for t in row if t != self.pad_id]
            out.append(self.sequence_nll(ids, ended=len(ids) < width))
        return torch.tensor(out, dtype=torch.float64)


def train_ngram_model(
    sequences: Tensor,
    vocab_size: int,
    *,
    pad_id: int = 0,
    order: int = 3,
    discount: float = DISCOUNT,
) -> NGramLanguageModel:
    """Count an interpolated Kneser–Ney n-gram model from token sequences.

    The highest order keeps raw counts; each lower order keeps continuation counts (the number
    of distinct ids seen before the n-gram), Kneser–Ney's estimate of how readily a word
    appears in new contexts. Deterministic: the same sequences give the same model.

    Args:
        sequences: (N, L) token ids (stored as floats or ints), right-padded with `pad_id`.
        vocab_size: the number of ids.
        pad_id: the padding id.
        order: n (1 = unigrams).
        discount: the absolute discount, in (0, 1).

    Raises:
        ValueError: no sequence, ids outside the vocabulary, or bad order/discount.
    """
    if order < 1:
        raise ValueError(f"an n-gram model needs order >= 1, got {order}")
    if not 0.0 < discount < 1.0:
        raise ValueError(f"the Kneser-Ney discount must lie in (0, 1), got {discount}")
    if sequences.dim() != 2 or sequences.shape[0] == 0:
        raise ValueError(f"train on (N, L) token sequences, N > 0; got {tuple(sequences.shape)}")
    ids = sequences.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    bos, eos = vocab_size + 1, vocab_size
    width = ids.shape[1]
    top: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
    token_count = 0
    for row in ids.tolist():
        kept = [t for t in row if t != pad_id]
        token_count += len(kept)
        symbols = [bos] * (order - 1) + kept + ([eos] if len(kept) < width else [])
        for i in range(order - 1, len(symbols)):
            top[tuple(symbols[i - order + 1 : i])][symbols[i]] += 1
    levels: list[dict[tuple[int, ...], Counter[int]]] = [dict(top)]
    for _ in range(order - 1):  # continuation counts: distinct ids seen before each n-gram
        lower: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
        for context, nexts in levels[0].items():
            for token in nexts:
                lower[context[1:]][token] += 1
        levels.insert(0, dict(lower))
    return NGramLanguageModel(
        order=order,
        vocab_size=vocab_size,
        pad_id=pad_id,
        discount=discount,
        sequences=int(ids.shape[0]),
        tokens=token_count,
        _levels=tuple(_level(level) for level in levels),
    )


def public_prior(
    obs: Observation, schema: TextSchema, *, order: int, weight: float
) -> tuple[NGramLanguageModel | None, str]:
    """The prior an attack with prior weight `weight` ranks by: an n-gram model counted from
    the token columns (the last ``schema.max_length``) of the public data the threat model
    grants, and a line for the report (why there is none, when there is none)."""
    if weight == 0:
        return None, "none: prior_weight is 0"
    public = obs.side_info.get("public_data")
    x = public.get("x") if isinstance(public, Mapping) else None
    if not isinstance(x, Tensor) or x.shape[0] == 0:
        return None, "none: the threat model grants no public data"
    assert isinstance(public, Mapping)
    model = train_ngram_model(
        x[:, x.shape[1] - schema.max_length :],
        schema.vocab_size,
        pad_id=schema.pad_id,
        order=order,
    )
    return model, (
        f"{model.order}-gram Kneser-Ney model of {model.sequences} public sequences "
        f"({model.tokens} tokens; {public.get('source', 'public data')})"
    )


__all__ = ["DISCOUNT", "NGramLanguageModel", "public_prior", "train_ngram_model"]
