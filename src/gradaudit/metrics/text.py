"""How well reconstructed token sequences match the private ones: ROUGE, BLEU, token accuracy.

Every function works on sequences of token ids (any hashable tokens, in fact): the scores are
those of the ``rouge-score`` package and of NLTK's BLEU computed on the ids, with no further
tokenisation, stemming or lowercasing (the ids already are the model's tokens). Padding is
dropped before anything is counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
from torch import Tensor

from gradaudit.metrics.bag import bag_metrics
from gradaudit.metrics.matching import best_pairing
from gradaudit.types import TextSchema

BLEU_EPSILON = 0.1
"""The count given to an n-gram order without any match (NLTK's smoothing ``method1``)."""


def ngram_counts(tokens: Sequence[Hashable], n: int) -> Counter[tuple[Hashable, ...]]:
    """How often each n-gram occurs in `tokens`.

    Example:
        >>> sorted(ngram_counts([1, 2, 1, 2], 2).items())
        [((1, 2), 2), ((2, 1), 1)]
    """
    if n < 1:
        raise ValueError(f"n-grams need n >= 1, got {n}")
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def f_measure(hits: int, predicted: int, reference: int) -> float:
    """F1 of `hits` matches among `predicted` items against `reference` items, the way
    ``rouge-score`` computes it: 0 when either side is empty or nothing matches.

    Example:
        >>> round(f_measure(6, 8, 9), 4)
        0.7059
    """
    precision = hits / max(predicted, 1)
    recall = hits / max(reference, 1)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def rouge_n(candidate: Sequence[Hashable], reference: Sequence[Hashable], n: int = 1) -> float:
    """ROUGE-N F1: n-gram overlap (each n-gram counted as often as it occurs on both sides).

    Precision is the overlap over the candidate's n-grams, recall over the reference's (Lin,
    "ROUGE: A Package for Automatic Evaluation of Summaries", ACL Workshop 2004); the F-measure
    is ``rouge-score``'s ``fmeasure``.

    Example (the ``rouge-score`` README's sentences, tokenised):
        >>> target = "the quick brown fox jumps over the lazy dog".split()
        >>> prediction = "the quick brown dog jumps on the log".split()
        >>> round(rouge_n(prediction, target, 1), 4)
        0.7059
    """
    cand, ref = ngram_counts(candidate, n), ngram_counts(reference, n)
    hits = sum((cand & ref).values())
    return f_measure(hits, cand.total(), ref.total())


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of `a` and `b` (dynamic programming).

    Example:
        >>> lcs_length("abcbdab", "bdcaba")
        4
    """
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    """ROUGE-L F1: the longest common subsequence over the candidate's and the reference's
    lengths (Lin 2004, sentence level, with ``rouge-score``'s balanced F-measure).

    Example:
        >>> target = "the quick brown fox jumps over the lazy dog".split()
        >>> prediction = "the quick brown dog jumps on the log".split()
        >>> round(rouge_l(prediction, target), 4)
        0.5882
    """
    return f_measure(lcs_length(candidate, reference), len(candidate), len(reference))


def modified_precision(
    candidate: Sequence[Hashable], references: Sequence[Sequence[Hashable]], n: int
) -> tuple[int, int]:
    """BLEU's clipped n-gram matches and the candidate's number of n-grams.

    Each candidate n-gram counts at most as often as it occurs in a single reference
    (Papineni et al. 2002, section 2.1).

    Example (the paper's "the the the ..." candidate):
        >>> modified_precision("the the the the the the the".split(),
        ...                    ["the cat is on the mat".split(),
        ...                     "there is a cat on the mat".split()], 1)
        (2, 7)
    """
    counts = ngram_counts(candidate, n)
    most: Counter[tuple[Hashable, ...]] = Counter()
    for reference in references:
        most |= ngram_counts(reference, n)
    return sum((counts & most).values()), counts.total()


def bleu(
    candidates: Sequence[Sequence[Hashable]],
    references: Sequence[Sequence[Sequence[Hashable]]],
    *,
    max_n: int = 4,
    epsilon: float | None = BLEU_EPSILON,
) -> float:
    """Corpus-level BLEU-`max_n` with uniform weights (Papineni, Roukos, Ward & Zhu, "BLEU: a
    Method for Automatic Evaluation of Machine Translation", ACL 2002).

    Clipped n-gram matches and candidate n-grams are summed over the corpus before dividing
    (micro-average), the brevity penalty compares the total candidate length with the total
    length of each candidate's closest reference (shorter on ties), and the score is 0 when no
    unigram matches: NLTK's ``corpus_bleu``. Smoothing: an order with no match at all gets
    `epsilon` matches instead of 0 (NLTK's ``SmoothingFunction().method1``, Chen & Cherry 2014),
    which keeps short sentences from scoring 0 for want of a 4-gram; None disables it. One
    difference from NLTK: an order that no candidate is long enough to have is left out of the
    geometric mean (sacrebleu's effective order) rather than counted as a miss, so a perfect
    reconstruction scores 1 whatever its length.

    Args:
        candidates: one token sequence per candidate.
        references: per candidate, one or more reference sequences.
        max_n: the highest n-gram order.
        epsilon: the smoothing count, or None.

    Example (NLTK's ``corpus_bleu`` docstring example: 0.5920...):
        >>> hyp1 = ("It is a guide to action which ensures that the military always obeys "
        ...         "the commands of the party").split()
        >>> refs1 = [("It is a guide to action that ensures that the military will forever "
        ...           "heed Party commands").split(),
        ...          ("It is the guiding principle which guarantees the military forces always "
        ...           "being under the command of the Party").split(),
        ...          ("It is the practical guide for the army always to heed the directions of "
        ...           "the party").split()]
        >>> hyp2 = "he read the book because he was interested in world history".split()
        >>> ref2 = "he was interested in world history because he read the book".split()
        >>> bleu([hyp1, hyp2], [refs1, [ref2]])  # doctest: +ELLIPSIS
        0.5920...
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if not candidates:
        raise ValueError("BLEU of an empty corpus")
    matches, totals = [0] * max_n, [0] * max_n
    cand_length = ref_length = 0
    for candidate, refs in zip(candidates, references, strict=True):
        if not refs:
            raise ValueError("every candidate needs at least one reference")
        for n in range(1, max_n + 1):
            hit, total = modified_precision(candidate, refs, n)
            matches[n - 1] += hit
            totals[n - 1] += total
        cand_length += len(candidate)
        ref_length += min((abs(len(r) - len(candidate)), len(r)) for r in refs)[1]
    if matches[0] == 0:
        return 0.0
    orders = [(m, t) for m, t in zip(matches, totals, strict=True) if t > 0]
    if any(m == 0 for m, _ in orders) and epsilon is None:
        return 0.0
    log_precision = sum(math.log((m if m > 0 else float(epsilon)) / t) for m, t in orders)  # type: ignore[arg-type]
    return brevity_penalty(ref_length, cand_length) * math.exp(log_precision / len(orders))


def brevity_penalty(reference_length: int, candidate_length: int) -> float:
    """BLEU's brevity penalty: 1 for a candidate at least as long, else ``exp(1 - r / c)``.

    Example (NLTK's doctest: references of 28 tokens, a candidate of 12):
        >>> round(brevity_penalty(28, 12), 6)
        0.263597
    """
    if candidate_length > reference_length:
        return 1.0
    if candidate_length == 0:
        return 0.0
    return math.exp(1.0 - reference_length / candidate_length)


def unpadded(ids: Tensor, pad_id: int) -> list[int]:
    """The ids of one sequence with every padding id dropped.

    Example:
        >>> import torch
        >>> unpadded(torch.tensor([4, 0, 7, 0]), 0)
        [4, 7]
    """
    return [int(i) for i in ids.tolist() if int(i) != pad_id]


def match_texts(rec: Sequence[Sequence[int]], truth: Sequence[Sequence[int]]) -> Tensor:
    """Pair each true sentence with one reconstruction, maximising the total ROUGE-1 F1.

    Ties are broken by ROUGE-L (weighted 1e-3), then by the index order. The order of a
    reconstructed batch carries no meaning, so scores are computed after this assignment
    (Hungarian algorithm, as LAMP's evaluation does with ROUGE-1).

    Returns:
        LongTensor ``perm`` (N,): ``rec[perm[i]]`` is matched to ``truth[i]``.

    Example:
        >>> match_texts([[5, 6], [1, 2, 3]], [[1, 2, 3], [5, 6, 7]])
        tensor([1, 0])
    """
    if len(rec) != len(truth):
        raise ValueError(f"{len(rec)} reconstructed sentences for {len(truth)} true ones")
    score = np.array(
        [[rouge_n(r, t, 1) + 1e-3 * rouge_l(r, t) for r in rec] for t in truth], dtype=np.float64
    )
    return best_pairing(score.reshape(len(truth), len(rec)), maximize=True)


def score_texts(
    rec_tokens: Tensor, true_tokens: Tensor, schema: TextSchema
) -> tuple[dict[str, float], Tensor]:
    """Score reconstructed token sequences against the private ones.

    The reconstructions are matched to the true sentences first (:func:`match_texts`); then

    * ``rouge1``, ``rouge2``, ``rougeL``: the mean over sentences of the F1 scores
      (:func:`rouge_n`, :func:`rouge_l`);
    * ``bleu``: corpus BLEU-4 of the matched pairs, NLTK ``method1`` smoothing (:func:`bleu`);
    * ``token_recall``, ``token_precision``, ``token_count_accuracy``: the batch's bag of words
      against the true one (:func:`gradaudit.metrics.bag.bag_metrics`: recall and precision over
      distinct tokens, count accuracy over multisets; order and sentence ignored), so a
      sentence attack and a bag-of-words attack report the same quantity under one name;
    * ``token_accuracy``: the share of true non-padding positions whose id the matched
      reconstruction has at the same position (breaching's token accuracy, padding excluded).

    Padding (`schema.pad_id`) is ignored everywhere.

    Args:
        rec_tokens: (N, L') reconstructed int ids.
        true_tokens: (N, L) true int ids.
        schema: the text layout (its padding id).

    Returns:
        ``(metrics, perm)``, with ``rec_tokens[perm]`` lined up with `true_tokens`.

    Example:
        >>> schema = TextSchema(("<pad>", "<unk>", "a", "b", "c"), 3)
        >>> import torch
        >>> metrics, perm = score_texts(torch.tensor([[4, 3, 0], [2, 3, 4]]),
        ...                             torch.tensor([[2, 3, 4], [3, 4, 0]]), schema)
        >>> perm.tolist(), metrics["rouge1"], metrics["rouge2"], metrics["token_accuracy"]
        ([1, 0], 1.0, 0.5, 0.6)
    """
    if rec_tokens.dim() != 2 or true_tokens.dim() != 2:
        raise ValueError(
            f"token sequences are (N, L); got {tuple(rec_tokens.shape)} and "
            f"{tuple(true_tokens.shape)}"
        )
    pad = schema.pad_id
    rec = [unpadded(row, pad) for row in rec_tokens.long()]
    truth = [unpadded(row, pad) for row in true_tokens.long()]
    perm = match_texts(rec, truth)
    matched = [rec[int(i)] for i in perm]
    n = len(truth)
    true_ids = true_tokens.long()
    rec_ids = rec_tokens.long()[perm]
    width = min(true_ids.shape[1], rec_ids.shape[1])
    real = true_ids != pad
    hits = (rec_ids[:, :width] == true_ids[:, :width]) & real[:, :width]
    metrics = {
        "rouge1": sum(rouge_n(r, t, 1) for r, t in zip(matched, truth, strict=True)) / n,
        "rouge2": sum(rouge_n(r, t, 2) for r, t in zip(matched, truth, strict=True)) / n,
        "rougeL": sum(rouge_l(r, t) for r, t in zip(matched, truth, strict=True)) / n,
        "bleu": bleu(matched, [[t] for t in truth]),
        "token_accuracy": int(hits.sum()) / max(1, int(real.sum())),
    }
    if bool(real.any()):
        all_rec = rec_tokens.long()
        metrics.update(bag_metrics(all_rec[all_rec != pad], true_ids[real], item="token"))
    return metrics, perm


__all__ = [
    "bleu",
    "lcs_length",
    "match_texts",
    "modified_precision",
    "rouge_l",
    "rouge_n",
    "score_texts",
]
