"""text_inversion on a toy transformer: exact recovery from an exact gradient, the discrete
machinery (moves, sweeps, batched distances), the prior, labels, budgets and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradaudit.attacks import ATTACKS
from gradaudit.attacks.base import attacker_model, gradient_estimate
from gradaudit.attacks.inversion.embedding import looked_up_rows
from gradaudit.attacks.inversion.text import (
    MOVES,
    TextInversionAttack,
    TextInversionParams,
    discrete_step,
    gradient_distance,
    rearrangement,
    rearrangements,
    sentence_confidence,
    token_matcher,
)
from gradaudit.metrics.text import score_texts
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe_batch
from gradaudit.types import Observation, TaskInfo, TextSchema

SENTENCES = [
    "what are the symptoms of asthma ?",
    "what are the treatments for diabetes ?",
    "how is high blood pressure diagnosed ?",
    "is asthma inherited ?",
    "who is at risk for heart disease ?",
    "how many people have diabetes ?",
    "what causes high blood pressure ?",
    "what is the outlook for asthma ?",
    "is heart disease inherited ?",
    "what are the symptoms of heart disease ?",
    "how is asthma diagnosed ?",
    "what are the treatments for asthma ?",
]
WORDS = sorted({w for s in SENTENCES for w in s.split()})
SCHEMA = TextSchema(("<pad>", "<unk>", *WORDS), max_length=8)
TASK = TaskInfo("toy-text", "text", (8,), 3, None, ("a", "b", "c"), text=SCHEMA)


def encode(sentences: list[str]) -> torch.Tensor:
    ids = {w: i for i, w in enumerate(SCHEMA.vocab)}
    out = torch.zeros(len(sentences), SCHEMA.max_length)
    for row, sentence in enumerate(sentences):
        tokens = [ids[w] for w in sentence.split()]
        out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.float32)
    return out


PRIVATE = [0, 1, 4]  # the clients' sentences; the others are public
PUBLIC = (encode([s for i, s in enumerate(SENTENCES) if i not in PRIVATE]), torch.zeros(9).long())


@pytest.fixture(scope="module")
def model() -> nn.Module:
    params = {"dim": 16, "heads": 2, "layers": 2, "ff": 32}
    return build_model("transformer", params, TASK, generator=torch_generator(0, "model"))


def observe(model, rows, labels, knows=("architecture", "labels", "public_data")) -> Observation:
    x = encode([SENTENCES[i] for i in rows])
    return observe_batch(
        model, x, torch.tensor(labels), TASK, knows=knows, public_data=PUBLIC, train_mode=False
    )


def run(model, obs, **params) -> tuple:
    result = TextInversionAttack(TextInversionParams(**params)).run(
        obs, model, rng=torch_generator(0, "attack")
    )
    return result


def test_one_sentence_is_recovered_exactly_by_gradient_matching(model) -> None:
    obs = observe(model, [4], [2])
    result = run(model, obs, init="random")
    assert result.status == "ok"
    truth = encode([SENTENCES[4]]).long()
    assert torch.equal(result.reconstruction.tokens, truth)
    assert result.details["explains_update"] is True
    assert result.details["init"] == "random"
    assert result.details["labels"] == "granted by the threat model"
    assert result.details["sentences"] == [SENTENCES[4]]
    assert result.details["token_set_size"] == len(set(SENTENCES[4].split()))
    assert result.details["longest_sequence"] == len(SENTENCES[4].split())
    assert float(result.reconstruction.confidence[0]) == pytest.approx(1.0, abs=1e-4)
    assert len(result.trace) > 0


def test_two_sentences_without_a_prior(model) -> None:
    obs = observe(model, [0, 1], [1, 1], knows=("architecture", "labels"))
    result = run(model, obs, iterations=200)
    truth = encode([SENTENCES[0], SENTENCES[1]]).long()
    metrics, _ = score_texts(result.reconstruction.tokens, truth, SCHEMA)
    assert metrics["rouge1"] >= 0.9
    assert result.details["prior"] == "none: the threat model grants no public data"
    assert result.reconstruction.confidence.shape == (2,)


def test_recovers_the_label_when_it_is_not_granted(model) -> None:
    obs = observe(model, [3], [2], knows=("architecture", "public_data"))
    result = run(model, obs)
    assert result.details["labels"] == "recovered (idlg)"
    assert result.reconstruction.labels.tolist() == [2]
    assert torch.equal(result.reconstruction.tokens, encode([SENTENCES[3]]).long())


def test_length_search_finds_a_shorter_sentence(model) -> None:
    obs = observe(model, [3, 4], [2, 0])  # 4 and 8 tokens: the gradient shows only the 8
    result = run(model, obs, length_search=True, iterations=200)
    assert result.details["explains_update"] is True
    assert result.details["lengths"] == [4, 8]
    assert result.details["sentences"] == [SENTENCES[3], SENTENCES[4]]


def test_coverage_weight_keeps_every_word_the_update_names() -> None:
    """On a trained model the search can settle on sentences that repeat some present words
    and leave others out (measured here without the weight: one of 15 words missing); the
    coverage weight ranks such candidates down, so every word comes back."""
    trained = build_model(
        "transformer",
        {"dim": 16, "heads": 2, "layers": 2, "ff": 32},
        TASK,
        generator=torch_generator(0, "model"),
    )
    optimiser = torch.optim.SGD(trained.parameters(), lr=0.5)
    x, y = encode(SENTENCES), torch.arange(len(SENTENCES)) % 3
    for _ in range(200):
        loss = nn.functional.cross_entropy(trained(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    rows = [0, 1, 4]
    obs = observe(trained, rows, [0, 1, 2])
    result = run(trained, obs, iterations=60, coverage_weight=5.0)
    present = set(encode([SENTENCES[i] for i in rows]).long().flatten().tolist()) - {0}
    assert set(result.reconstruction.tokens.flatten().tolist()) - {0} == present


def test_positions_start_gives_one_sequence_at_once(model) -> None:
    obs = observe(model, [2], [0])
    result = run(model, obs)
    assert result.details["init"].startswith("positions")
    assert result.details["continuous_steps"] == [0]
    assert torch.equal(result.reconstruction.tokens, encode([SENTENCES[2]]).long())
    assert "Kneser-Ney" in result.details["prior"]


def test_matcher_distances_equal_the_model_gradient_of_each_candidate(model) -> None:
    obs = observe(model, [0, 3], [0, 2])
    grads, _ = gradient_estimate(obs.updates[0], obs)
    key = "token_embedding.weight"
    allowed = looked_up_rows(grads[key])
    matcher = token_matcher(attacker_model(model, obs), grads, key, allowed, torch.tensor([0, 2]))
    truth = encode([SENTENCES[0], SENTENCES[3]]).long()
    lengths = torch.tensor([7, 4])
    candidates, cand_lengths, _ = rearrangements(
        truth, lengths, 0, 6, torch.Generator().manual_seed(0), pool=allowed
    )
    batched = matcher.distances(candidates, cand_lengths)
    assert float(batched[0]) == pytest.approx(0.0, abs=1e-6)
    net = attacker_model(model, obs)
    names = [*matcher.names, key]
    for k in range(candidates.shape[0]):
        x = torch.where(torch.arange(8) < cand_lengths[k, :, None], candidates[k], 0)
        loss = nn.functional.cross_entropy(net(x.float()), torch.tensor([0, 2]))
        params = dict(net.named_parameters())
        got = torch.autograd.grad(loss, [params[n] for n in names])
        direct = gradient_distance(
            [*got[:-1], got[-1][allowed]], [*matcher.target, grads[key][allowed]]
        )
        assert float(batched[k]) == pytest.approx(float(direct), abs=1e-5)
    confidence = sentence_confidence(matcher, truth, lengths)
    assert torch.allclose(confidence, torch.ones(2, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("move", MOVES)
def test_rearrangements_are_permutations(move: str) -> None:
    rng = torch.Generator().manual_seed(3)
    for length in range(1, 9):
        for _ in range(20):
            perm = rearrangement(length, move, rng)
            assert sorted(perm.tolist()) == list(range(length))
    with pytest.raises(ValueError, match="unknown move"):
        rearrangement(4, "shuffle", rng)


def test_candidates_follow_their_sources_and_keep_the_first_unchanged() -> None:
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    lengths = torch.tensor([4, 3])
    pool = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])
    cands, cand_lengths, source = rearrangements(
        tokens, lengths, 1, 60, torch.Generator().manual_seed(0), pool=pool, full_length=4
    )
    assert torch.equal(cands[0], tokens)
    moved = tokens.flatten()[source.flatten(1)].view_as(cands)
    replaced = cands != moved
    # a candidate differs from what its sources say only by a replacement with a pool token
    assert bool(torch.isin(cands[replaced], pool).all())
    assert int(replaced.flatten(1).any(dim=1).sum()) > 0
    assert bool((cand_lengths.max(dim=1).values == 4).all())  # someone keeps the longest
    assert set(cand_lengths[:, 1].tolist()) > {3}


def test_a_discrete_step_never_raises_the_cost() -> None:
    target = torch.tensor([[3, 1, 2, 4]])

    def score(tokens: torch.Tensor, _lengths: torch.Tensor) -> torch.Tensor:
        return (tokens != target).sum(dim=(1, 2)).double()

    tokens, lengths = torch.tensor([[4, 2, 1, 3]]), torch.tensor([4])
    costs = []
    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        tokens, lengths, source, cost = discrete_step(
            tokens, lengths, score, candidates=20, rng=rng
        )
        costs.append(cost)
        assert sorted(source.flatten().tolist()) == [0, 1, 2, 3]
    assert costs == sorted(costs, reverse=True)
    assert costs[-1] == 0.0


def test_stops_at_max_seconds_with_the_best_candidate(model) -> None:
    obs = observe(model, [0, 1, 4], [0, 1, 2])
    result = run(model, obs, max_seconds=1.0, iterations=10**6, init="random")
    assert result.status == "ok"
    assert result.details["iterations_run"] < 10**6
    assert result.reconstruction.tokens.shape == (3, 8)
    best = min(point[2] for point in result.trace)
    assert result.details["objective"] <= best + 1e-12


def test_refuses_what_it_cannot_attack(model) -> None:
    obs = observe(model, [0], [0])
    attack = TextInversionAttack(TextInversionParams(max_sequences=1))
    image = TaskInfo("digits", "image", (1, 8, 8), 10, None, tuple("0123456789"))
    cases = {
        "reconstructs token sequences": Observation(
            1, 0, obs.global_params, obs.updates, None, obs.side_info, image
        ),
        "does not know the model architecture": Observation(
            1, 0, obs.global_params, obs.updates, None, {}, TASK
        ),
        "only the aggregate": Observation(
            1, 0, obs.global_params, (), obs.updates[0].tensors, obs.side_info, TASK
        ),
        "more than max_sequences=1": observe(model, [0, 1], [0, 1]),
    }
    for reason, case in cases.items():
        result = attack.run(case, model, rng=torch.Generator())
        assert result.status == "not_applicable" and reason in str(result.reason), reason
        assert attack.applicable(case) is not None
    tabular = build_model("mlp", {"hidden": [8]}, TASK, generator=torch_generator(0, "m"))
    text_obs = observe_batch(tabular, encode([SENTENCES[0]]), torch.tensor([0]), TASK)
    result = attack.run(text_obs, tabular, rng=torch.Generator())
    assert result.status == "not_applicable" and "token embeddings" in str(result.reason)


def test_params_are_strict_and_registered() -> None:
    assert ATTACKS.get("text_inversion") is TextInversionAttack
    with pytest.raises(ValueError):
        TextInversionParams(iteratons=3)  # type: ignore[call-arg]
    assert TextInversionParams().loss == "tag"
