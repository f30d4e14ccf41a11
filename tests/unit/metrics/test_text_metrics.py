"""Text metrics against published examples (rouge-score's README, NLTK's and Papineni et al.'s
BLEU examples) and hand computations; score_texts' matching and padding rules."""

from __future__ import annotations

import math

import pytest
import torch

from gradaudit.metrics.text import (
    bleu,
    brevity_penalty,
    lcs_length,
    match_texts,
    modified_precision,
    rouge_l,
    rouge_n,
    score_texts,
)
from gradaudit.types import TextSchema


def words(text: str) -> list[str]:
    return text.split()


# rouge-score's README: scorer.score(target, prediction)
TARGET = words("the quick brown fox jumps over the lazy dog")
PREDICTION = words("the quick brown dog jumps on the log")

# NLTK's sentence_bleu / corpus_bleu docstrings (from Papineni et al.'s examples)
HYP1 = words(
    "It is a guide to action which ensures that the military always obeys the commands of the party"
)
REF1A = words(
    "It is a guide to action that ensures that the military will forever heed Party commands"
)
REF1B = words(
    "It is the guiding principle which guarantees the military forces always being under the "
    "command of the Party"
)
REF1C = words("It is the practical guide for the army always to heed the directions of the party")
HYP2 = words("he read the book because he was interested in world history")
REF2 = words("he was interested in world history because he read the book")


def test_rouge_matches_the_rouge_score_readme_example() -> None:
    # rouge1: Score(precision=0.75, recall=0.6666666666666666, fmeasure=0.7058823529411765)
    assert rouge_n(PREDICTION, TARGET, 1) == pytest.approx(0.7058823529411765, abs=1e-12)
    # rougeL: Score(precision=0.625, recall=0.5555555555555556, fmeasure=0.5882352941176471)
    assert rouge_l(PREDICTION, TARGET) == pytest.approx(0.5882352941176471, abs=1e-12)


def test_rouge2_by_hand() -> None:
    # shared bigrams: (the quick), (quick brown): precision 2/7, recall 2/8
    precision, recall = 2 / 7, 2 / 8
    expected = 2 * precision * recall / (precision + recall)
    assert rouge_n(PREDICTION, TARGET, 2) == pytest.approx(expected, abs=1e-12)
    # repeats count as often as they occur on both sides: "a a a" vs "a b a"
    assert rouge_n([1, 1, 1], [1, 2, 1], 1) == pytest.approx(2 / 3)


def test_rouge_of_empty_or_disjoint_sequences_is_zero_and_identity_is_one() -> None:
    assert rouge_n([], [1, 2], 1) == 0.0
    assert rouge_l([1, 2], []) == 0.0
    assert rouge_n([3, 4], [1, 2], 1) == 0.0
    assert rouge_n([1, 2, 3], [1, 2, 3], 2) == 1.0
    assert rouge_l([1, 2, 3], [1, 2, 3]) == 1.0


def test_lcs_is_order_sensitive() -> None:
    assert lcs_length([1, 2, 3, 4], [4, 3, 2, 1]) == 1
    assert lcs_length([1, 2, 3, 4], [1, 3, 4]) == 3
    assert lcs_length([], [1]) == 0


def test_bleu_matches_nltk_and_the_paper() -> None:
    refs1 = [REF1A, REF1B, REF1C]
    # NLTK sentence_bleu docstring: 0.5045...
    assert bleu([HYP1], [refs1]) == pytest.approx(0.5045, abs=1e-4)
    # NLTK corpus_bleu docstring: 0.5920...; the mean of sentence BLEUs differs (0.6223...)
    assert bleu([HYP1, HYP2], [refs1, [REF2]]) == pytest.approx(0.5920, abs=1e-4)
    mean = (bleu([HYP1], [refs1]) + bleu([HYP2], [[REF2]])) / 2
    assert mean == pytest.approx(0.6223, abs=1e-4)


def test_modified_precision_matches_the_paper() -> None:
    # Papineni et al. 2002, section 2.1: "the the the the the the the" scores 2/7
    refs = [words("the cat is on the mat"), words("there is a cat on the mat")]
    assert modified_precision(words("the the the the the the the"), refs, 1) == (2, 7)
    # NLTK: hypothesis 1's unigram precision 0.9444... (17/18) and bigram 10/17
    refs1 = [REF1A, REF1B, REF1C]
    assert modified_precision(HYP1, refs1, 1) == (17, 18)
    assert modified_precision(HYP1, refs1, 2) == (10, 17)


def test_brevity_penalty_matches_nltk() -> None:
    assert brevity_penalty(28, 12) == pytest.approx(0.2635971381157267, abs=1e-12)
    assert brevity_penalty(12, 12) == 1.0
    assert brevity_penalty(12, 13) == 1.0
    assert brevity_penalty(5, 0) == 0.0


def test_bleu_smoothing_by_hand() -> None:
    # "a b x c d" against "a b y c d": precisions 4/5, 2/4, 0/3, 0/2; method1 gives each empty
    # order 0.1 matches; same lengths, no brevity penalty
    log_p = math.log(4 / 5) + math.log(2 / 4) + math.log(0.1 / 3) + math.log(0.1 / 2)
    cand, ref = [1, 2, 9, 3, 4], [1, 2, 8, 3, 4]
    assert bleu([cand], [[ref]]) == pytest.approx(math.exp(log_p / 4), abs=1e-12)
    assert bleu([cand], [[ref]], epsilon=None) == 0.0
    assert bleu([[5, 6]], [[[1, 2]]]) == 0.0  # no unigram match at all


def test_bleu_leaves_out_orders_too_long_for_every_candidate() -> None:
    # "a b c" against "a b c d": 3/3, 2/2, 1/1 and no 4-gram at all (effective order 3);
    # brevity penalty exp(1 - 4/3)
    assert bleu([[1, 2, 3]], [[[1, 2, 3, 4]]]) == pytest.approx(math.exp(1 - 4 / 3))
    assert bleu([[1, 2]], [[[1, 2]]]) == pytest.approx(1.0)


def test_bleu_rejects_mismatched_corpora() -> None:
    with pytest.raises(ValueError, match="reference sets"):
        bleu([[1]], [])
    with pytest.raises(ValueError, match="at least one reference"):
        bleu([[1]], [[]])


SCHEMA = TextSchema(("<pad>", "<unk>", *(f"w{i}" for i in range(10))), max_length=6)


def test_score_texts_is_invariant_to_the_batch_order_and_perfect_on_the_truth() -> None:
    truth = torch.tensor([[2, 3, 4, 5, 0, 0], [6, 7, 8, 9, 10, 11], [4, 4, 2, 0, 0, 0]])
    metrics, perm = score_texts(truth, truth, SCHEMA)
    assert perm.tolist() == [0, 1, 2]
    assert all(v == pytest.approx(1.0) for v in metrics.values())
    shuffled = truth[[2, 0, 1]]
    metrics2, perm2 = score_texts(shuffled, truth, SCHEMA)
    assert torch.equal(shuffled[perm2], truth)
    assert metrics2 == metrics


def test_score_texts_ignores_padding_and_scores_the_bag_like_bag_metrics() -> None:
    truth = torch.tensor([[2, 3, 4, 5, 0, 0]])
    # same tokens, one pair swapped, and padding inside the sequence (ignored by ROUGE/BLEU)
    rec = torch.tensor([[2, 0, 4, 3, 5, 0]])
    metrics, _ = score_texts(rec, truth, SCHEMA)
    assert metrics["rouge1"] == pytest.approx(1.0)
    assert metrics["token_recall"] == pytest.approx(1.0)
    # positions: 2 matches (position 0 and 2) of 4 true tokens
    assert metrics["token_accuracy"] == pytest.approx(0.5)
    # bigrams (2 4) (4 3) (3 5) vs (2 3) (3 4) (4 5): none shared
    assert metrics["rouge2"] == 0.0
    # LCS of 2 4 3 5 and 2 3 4 5 is 3
    assert metrics["rougeL"] == pytest.approx(0.75)
    # token recall and precision count distinct tokens; count accuracy counts repeats only as
    # often as they occur in the truth (the definitions of metrics.bag.bag_metrics)
    metrics, _ = score_texts(torch.tensor([[2, 2, 2, 2, 0, 0]]), truth, SCHEMA)
    assert metrics["token_recall"] == pytest.approx(0.25)
    assert metrics["token_precision"] == pytest.approx(1.0)
    assert metrics["token_count_accuracy"] == pytest.approx(0.25)
    metrics, _ = score_texts(torch.tensor([[2, 3, 0]]), torch.tensor([[2, 2, 3]]), SCHEMA)
    assert metrics["token_recall"] == metrics["token_precision"] == pytest.approx(1.0)
    assert metrics["token_count_accuracy"] == pytest.approx(2 / 3)
    # nothing recovered
    metrics, _ = score_texts(torch.zeros(1, 6, dtype=torch.long), truth, SCHEMA)
    assert metrics == {k: 0.0 for k in metrics}


def test_score_texts_hand_example_two_sentences() -> None:
    truth = torch.tensor([[2, 3, 4, 0], [5, 6, 7, 8]])
    rec = torch.tensor([[5, 6, 8, 7], [2, 3, 9, 0]])
    metrics, perm = score_texts(rec, truth, SCHEMA)
    assert perm.tolist() == [1, 0]
    # sentence 1: 2/3 unigrams both ways; sentence 2: 4/4 unigrams
    assert metrics["rouge1"] == pytest.approx((2 / 3 + 1.0) / 2)
    # bigrams: (2 3) of 2 and 2; (5 6) of 3 and 3
    assert metrics["rouge2"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    # positions: 2 + 2 of 7 true tokens
    assert metrics["token_accuracy"] == pytest.approx(4 / 7)
    assert metrics["token_recall"] == pytest.approx(6 / 7)


def test_match_texts_refuses_batches_of_different_sizes() -> None:
    with pytest.raises(ValueError, match="reconstructed sentences"):
        match_texts([[1]], [[1], [2]])
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        score_texts(torch.tensor([1, 2]), torch.tensor([[1, 2]]), SCHEMA)
