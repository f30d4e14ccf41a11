"""The n-gram prior of text_inversion: a proper distribution, Kneser-Ney's continuation
counts, padding and sequence ends, and a preference for the sentences of its corpus."""

from __future__ import annotations

import pytest
import torch

from gradaudit.attacks.inversion.language import train_ngram_model

WORDS = ("<pad>", "<unk>", "what", "are", "the", "symptoms", "of", "asthma", "treatments", "for")
WORDS += ("diabetes", "is", "inherited", "?", "how", "many", "people", "have", "san", "francisco")
ID = {w: i for i, w in enumerate(WORDS)}
SENTENCES = [
    "what are the symptoms of asthma ?",
    "what are the treatments for asthma ?",
    "what are the symptoms of diabetes ?",
    "what are the treatments for diabetes ?",
    "is asthma inherited ?",
    "is diabetes inherited ?",
    "how many people have asthma ?",
    "how many people have diabetes ?",
]


def encode(sentences: list[str], length: int = 8) -> torch.Tensor:
    out = torch.zeros(len(sentences), length)
    for i, s in enumerate(sentences):
        ids = [ID[w] for w in s.split()][:length]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.float32)
    return out


CORPUS = encode(SENTENCES)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_probabilities_sum_to_one_in_seen_and_unseen_contexts(order: int) -> None:
    lm = train_ngram_model(CORPUS, len(WORDS), order=order)
    predictable = [t for t in range(len(WORDS)) if t != 0] + [lm.eos]
    for history in ([], [ID["what"], ID["are"]], [ID["san"], ID["francisco"]], [ID["?"]]):
        total = sum(lm.probability(t, history) for t in predictable)
        assert total == pytest.approx(1.0, abs=1e-9), history


def test_corpus_sentences_are_likelier_than_their_shuffles_and_unseen_words_stay_finite() -> None:
    lm = train_ngram_model(CORPUS, len(WORDS))
    natural = encode(["what are the symptoms of asthma ?", "is diabetes inherited ?"])
    shuffled = encode(["asthma of the what are symptoms ?", "inherited diabetes ? is"])
    assert (lm.nll(natural) < lm.nll(shuffled)).all()
    unseen = lm.nll(encode(["san francisco ?"]))
    assert torch.isfinite(unseen).all() and float(unseen[0]) > float(lm.nll(natural).max())


def test_training_is_deterministic_and_counts_what_it_saw() -> None:
    a = train_ngram_model(CORPUS, len(WORDS))
    b = train_ngram_model(CORPUS[torch.arange(len(SENTENCES))], len(WORDS))
    probe = encode(["how many people have the symptoms ?"])
    assert torch.equal(a.nll(probe), b.nll(probe))
    assert a.sequences == len(SENTENCES)
    assert a.tokens == sum(len(s.split()) for s in SENTENCES)


def test_kneser_ney_prefers_words_that_follow_many_different_words() -> None:
    # "francisco" is frequent but always after "san"; "asthma" is rarer but follows three
    # different words: in a new context (unigram level) Kneser-Ney ranks asthma higher
    corpus = encode(["san francisco"] * 6 + ["of asthma", "for asthma", "have asthma"], length=4)
    lm = train_ngram_model(corpus, len(WORDS), order=2)
    unseen_context = [ID["the"]]
    assert lm.probability(ID["asthma"], unseen_context) > lm.probability(
        ID["francisco"], unseen_context
    )
    # after "san", francisco is near certain
    assert lm.probability(ID["francisco"], [ID["san"]]) > 0.5


def test_padding_marks_an_end_and_full_sequences_are_truncated_not_ended() -> None:
    corpus = encode(["is asthma inherited ?"] * 4, length=4)  # full rows: no end symbol
    ended = encode(["is asthma inherited ?"] * 4, length=6)  # padded rows: they end
    lm_full = train_ngram_model(corpus, len(WORDS), order=2)
    lm_ended = train_ngram_model(ended, len(WORDS), order=2)
    assert lm_ended.probability(lm_ended.eos, [ID["?"]]) > 0.5
    assert lm_full.probability(lm_full.eos, [ID["?"]]) < 0.1
    # padding after the ids asks for the end symbol, which only the model that saw ends expects
    padded = encode(["is asthma inherited ?"], 6)
    assert float(lm_ended.nll(padded)[0]) < float(lm_full.nll(padded)[0])
    full = encode(["is asthma inherited ?"], 4)
    assert float(lm_full.nll(full)[0]) < float(lm_full.nll(padded)[0])


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="order"):
        train_ngram_model(CORPUS, len(WORDS), order=0)
    with pytest.raises(ValueError, match="discount"):
        train_ngram_model(CORPUS, len(WORDS), discount=1.0)
    with pytest.raises(ValueError, match="token ids"):
        train_ngram_model(CORPUS, 5)
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        train_ngram_model(torch.zeros(0, 4), len(WORDS))


def test_bigram_probabilities_equal_chen_and_goodmans_formula_by_hand() -> None:
    """Interpolated Kneser-Ney (Chen & Goodman 1998, eq. 17 with one discount D = 0.75):
    P(w | v) = max(c(v w) - D, 0) / c(v) + D N1+(v .) / c(v) * P_cont(w), and
    P_cont(w) = max(N1+(. w) - D, 0) / N1+(. .) + D |{u: N1+(. u) > 0}| / N1+(. .) * 1 / |V|,
    with |V| = 6 predictable symbols here (ids 1..5 and the end symbol; padding never)."""
    # sequences <s> 2 3 4 </s> and <s> 2 3 5 </s>
    lm = train_ngram_model(torch.tensor([[2, 3, 4, 0], [2, 3, 5, 0]]), 6, order=2)
    d = 0.75
    # continuation counts N1+(. w): 2 <- <s>; 3 <- 2; 4 <- 3; 5 <- 3; </s> <- 4, 5 (6 in all,
    # 5 distinct words)
    cont = {1: 0, 2: 1, 3: 1, 4: 1, 5: 1, lm.eos: 2}
    p_cont = {w: max(c - d, 0) / 6 + d * 5 / 6 / 6 for w, c in cont.items()}
    assert p_cont[4] == pytest.approx(0.875 / 6) and p_cont[lm.eos] == pytest.approx(0.3125)
    # after 3: c(3) = 2, c(3 4) = c(3 5) = 1, N1+(3 .) = 2
    by_hand = {w: max(int(w in (4, 5)) - d, 0) / 2 + d * 2 / 2 * p_cont[w] for w in cont}
    assert by_hand[4] == pytest.approx(0.234375) and by_hand[1] == pytest.approx(0.078125)
    for w, p in by_hand.items():
        assert lm.probability(w, [3]) == pytest.approx(p, abs=1e-12), w
    # an unseen context backs off to the continuation distribution itself
    assert lm.probability(4, [1]) == pytest.approx(p_cont[4], abs=1e-12)
