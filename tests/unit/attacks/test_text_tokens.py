"""text_tokens: the bag of words from the token-embedding gradient is exact on a toy transformer;
counts and order follow for one sequence; noise, FedAvg and missing inputs behave as documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradaudit.attacks import ATTACKS, build_attack
from gradaudit.attacks.inversion.tokens import (
    TextTokensAttack,
    TextTokensParams,
    position_assignment,
    token_embedding_key,
)
from gradaudit.data import load_dataset
from gradaudit.errors import ConfigError
from gradaudit.federation.local import LocalPlan, train_clients_loop
from gradaudit.metrics.bag import bag_metrics, true_bag
from gradaudit.models import build_model
from gradaudit.threat import observe_batch, observe_fedavg
from gradaudit.types import ClientUpdate, Observation, TaskInfo, TextSchema

SCHEMA = TextSchema(("<pad>", "<unk>", *(f"w{i}" for i in range(38))), max_length=12)
TASK = TaskInfo("toy-text", "text", (12,), 3, None, ("a", "b", "c"), text=SCHEMA)


def _model(seed: int = 0, **params: int) -> nn.Module:
    params = {"dim": 16, "heads": 2, "layers": 2, "ff": 32, **params}
    return build_model("transformer", params, TASK, generator=torch.Generator().manual_seed(seed))


def _batch(size: int, seed: int, *, vocab: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows with repeats and right padding of varied lengths (every row non-empty)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (size, 12), generator=g)  # id 1 (<unk>) is a real token
    lengths = torch.randint(3, 13, (size,), generator=g)
    x[torch.arange(12)[None, :] >= lengths[:, None]] = 0
    return x.float(), torch.randint(0, 3, (size,), generator=g)


def _attack(**params: object) -> TextTokensAttack:
    return TextTokensAttack(TextTokensParams(**params))  # type: ignore[arg-type]


def _run(obs: Observation, model: nn.Module, **params: object):
    return _attack(**params).run(obs, model, rng=torch.Generator().manual_seed(0))


def _with_update(obs: Observation, **changes: object) -> Observation:
    update = dataclasses.replace(obs.updates[0], **changes)
    return dataclasses.replace(obs, updates=(update,))


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("size", [2, 4, 8])
def test_bag_is_exact_on_a_fedsgd_gradient_with_padding(size: int) -> None:
    model = _model()
    for seed in range(3):
        x, y = _batch(size, seed)
        assert (x == 0).any()  # padding present
        result = _run(observe_batch(model, x, y, TASK), model)
        assert result.status == "ok"
        truth, item = true_bag(x, TASK)
        metrics = bag_metrics(result.reconstruction.bag, truth, item=item)
        assert metrics["token_recall"] == metrics["token_precision"] == 1.0
        assert result.details["count_method"] == "distinct"
        assert result.details["longest_sequence"] == int((x != 0).sum(dim=1).max())
        assert result.reconstruction.tokens is None
        assert result.details["words"] == [SCHEMA.vocab[i] for i in sorted(set(truth.tolist()))]


def test_one_sequence_gives_exact_counts_and_order() -> None:
    model = _model(seed=1)
    for seed in range(5):
        x, y = _batch(1, 10 + seed, vocab=8)  # few ids: many repeats
        length = int((x != 0).sum())
        result = _run(observe_batch(model, x, y, TASK), model)
        rec = result.reconstruction
        assert result.details["count_method"] == "positions"
        assert result.details["total_tokens"] == length
        assert torch.equal(rec.tokens, x.long())  # the sequence itself, padding included
        truth, _ = true_bag(x, TASK)
        assert torch.equal(rec.bag, torch.sort(truth).values)
        assert bag_metrics(rec.bag, truth, item="token")["token_count_accuracy"] == 1.0
        assert result.details["sequence"] == SCHEMA.decode(x[0])


def test_counts_distinct_returns_each_id_once_even_for_one_sequence() -> None:
    model = _model()
    x = torch.tensor([[5.0, 5.0, 7.0, 5.0, 0.0, 0.0, 0, 0, 0, 0, 0, 0]])
    result = _run(observe_batch(model, x, torch.tensor([0]), TASK), model, counts="distinct")
    assert result.reconstruction.bag.tolist() == [5, 7]
    assert result.reconstruction.tokens is None
    assert "distinct was asked for" in result.details["count_note"]


def test_fedavg_delta_gives_the_union_of_the_local_batches() -> None:
    model = _model()
    x, y = _batch(6, 3)
    obs = observe_fedavg(model, x, y, TASK, lr=0.5, batch_size=2)
    result = _run(obs, model)
    truth, _ = true_bag(x, TASK)
    metrics = bag_metrics(result.reconstruction.bag, truth, item="token")
    assert metrics["token_recall"] == metrics["token_precision"] == 1.0
    assert "union" in result.details["note"]
    # the last local batch alone would miss tokens that only the first two held
    assert set(true_bag(x[4:], TASK)[0].tolist()) < set(truth.tolist())


def test_one_sequence_over_several_local_steps_still_gives_counts() -> None:
    # The token rows of the summed steps are still sums of the summed position rows.
    model = _model(seed=2)
    x, y = _batch(1, 21, vocab=10)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = LocalPlan(0, tuple(np.zeros(1, dtype=np.int64) for _ in range(3)))
    (delta,) = train_clients_loop(model, state, x, y, [plan], algorithm="fedavg", lr=0.3)
    obs = dataclasses.replace(
        observe_batch(model, x, y, TASK), updates=(ClientUpdate(0, 1, "delta", delta, 1),)
    )
    result = _run(obs, model)
    assert result.details["count_method"] == "positions"
    assert torch.equal(result.reconstruction.tokens, x.long())


# --------------------------------------------------------------------------- noise and rtol


def test_rtol_separates_true_rows_from_small_noise_and_zero_keeps_everything() -> None:
    model = _model()
    x, y = _batch(4, 7)
    obs = observe_batch(model, x, y, TASK)
    key = "token_embedding.weight"
    grad = obs.updates[0].tensors[key]
    g = torch.Generator().manual_seed(0)
    smallest = float(grad.norm(dim=1)[grad.norm(dim=1) > 0].min())
    noise = torch.randn(grad.shape, generator=g) * (0.01 * smallest / grad.shape[1] ** 0.5)
    noisy = _with_update(obs, tensors={**obs.updates[0].tensors, key: grad + noise})
    truth, _ = true_bag(x, TASK)

    exact = _run(noisy, model)  # rtol 0: every row is non-zero now
    assert exact.reconstruction.bag.tolist() == list(range(1, SCHEMA.vocab_size))  # no <pad>
    assert bag_metrics(exact.reconstruction.bag, truth, item="token")["token_recall"] == 1.0

    top = float(grad.norm(dim=1).max())
    tolerant = _run(noisy, model, rtol=0.5 * smallest / top)
    metrics = bag_metrics(tolerant.reconstruction.bag, truth, item="token")
    assert metrics["token_recall"] == metrics["token_precision"] == 1.0
    assert tolerant.details["count_method"] == "distinct"

    strict = _run(noisy, model, rtol=0.99)  # only rows within 1 % of the largest survive
    assert 1 <= strict.reconstruction.bag.numel() < len(set(truth.tolist()))


@pytest.mark.parametrize(
    ("noise", "count_tol", "method"),
    [(1e-5, 0.01, "positions"), (1e-2, 0.01, "distinct"), (1e-2, 0.4, "positions")],
)
def test_noise_on_one_sequence_keeps_counts_while_the_assignment_rounds_within_count_tol(
    noise: float, count_tol: float, method: str
) -> None:
    model = _model()
    x, y = _batch(1, 4)
    obs = observe_batch(model, x, y, TASK)
    g = torch.Generator().manual_seed(1)
    tensors = {
        k: v + noise * v.abs().max() * torch.randn(v.shape, generator=g)
        for k, v in obs.updates[0].tensors.items()
    }
    result = _run(_with_update(obs, tensors=tensors), model, rtol=0.3, count_tol=count_tol)
    assert result.details["count_method"] == method
    if method == "positions":
        assert torch.equal(result.reconstruction.tokens, x.long())
        assert result.details["assignment_deviation"] <= count_tol
    else:
        assert result.reconstruction.tokens is None
        assert result.details["assignment_deviation"] > count_tol
        assert "assignment was refused" in result.details["count_note"]


def test_params_are_validated() -> None:
    with pytest.raises(ConfigError, match="rtol"):
        build_attack("text_tokens", {"rtol": 1.0})
    with pytest.raises(ConfigError, match="counts"):
        build_attack("text_tokens", {"counts": "norms"})
    with pytest.raises(ConfigError, match="count_tol"):
        build_attack("text_tokens", {"count_tol": 0.5})
    assert "text_tokens" in ATTACKS.names()


# --------------------------------------------------------------------------- not applicable


def test_not_applicable_reasons() -> None:
    model = _model()
    x, y = _batch(2, 0)
    obs = observe_batch(model, x, y, TASK)

    digits = load_dataset("digits", None)
    mlp = build_model("mlp", {"hidden": [8]}, digits.info, generator=torch.Generator())
    image_obs = observe_batch(mlp, digits.x_train[:2], digits.y_train[:2], digits.info)
    assert "digits is image" in _run(image_obs, mlp).reason

    blind = observe_batch(model, x, y, TASK, knows=())
    assert _run(blind, model).reason == "the adversary does not know the model architecture"

    withheld = _with_update(obs, withheld=frozenset({"token_embedding.weight"}))
    assert "withheld the token embedding" in _run(withheld, model).reason
    assert _attack().applicable(withheld) is None  # without the model it cannot tell
    assert "withheld the token embedding" in str(_attack().applicable(withheld, model))

    other = nn.Sequential(nn.Embedding(7, 4))  # no embedding of the vocabulary's size
    assert "no single token embedding" in _run(obs, other).reason

    aggregate_only = dataclasses.replace(obs, updates=(), aggregate=obs.updates[0].tensors)
    assert "only the aggregate" in _run(aggregate_only, model).reason


def test_token_embedding_is_found_by_size_or_by_name() -> None:
    net = nn.Module()
    net.words = nn.Embedding(SCHEMA.vocab_size, 4)
    net.positions = nn.Embedding(SCHEMA.max_length, 4)
    assert token_embedding_key(net, SCHEMA) == "words.weight"
    net.other = nn.Embedding(SCHEMA.vocab_size, 4)
    assert token_embedding_key(net, SCHEMA) is None  # ambiguous
    net.token_embedding = nn.Embedding(SCHEMA.vocab_size, 4)
    assert token_embedding_key(net, SCHEMA) == "token_embedding.weight"


def test_position_assignment_refuses_what_is_not_a_sum_of_position_rows() -> None:
    g = torch.Generator().manual_seed(0)
    positions = torch.randn(5, 8, generator=g)
    tokens = torch.stack([positions[0] + positions[3], positions[1], positions[2] + positions[4]])
    found = position_assignment(tokens, positions)
    assert found.owner.tolist() == [0, 1, 2, 0, 2]
    assert found.deviation < 1e-6 and found.residual < 1e-6
    noisy = tokens + 0.3 * torch.randn(3, 8, generator=g)
    found = position_assignment(noisy, positions)
    assert found.owner is None and found.deviation > 0.01
    assert position_assignment(noisy, positions, tol=0.49).owner.tolist() == [0, 1, 2, 0, 2]
    # more positions than dimensions: the assignment is not unique, so none is given
    assert position_assignment(tokens[:, :4], positions[:, :4]).owner is None
    # a token row that is no sum of position rows
    assert position_assignment(torch.randn(2, 8, generator=g), positions).owner is None


# --------------------------------------------------------------------------- real text


@pytest.mark.data
def test_medquad_bags_are_exact(shared_data_dir: Path) -> None:
    data = load_dataset("medquad", shared_data_dir)
    model = build_model(
        "transformer", {"dim": 64}, data.info, generator=torch.Generator().manual_seed(0)
    )
    g = torch.Generator().manual_seed(0)
    for size in (1, 4, 16):
        idx = torch.randperm(len(data.y_train), generator=g)[:size]
        x, y = data.x_train[idx], data.y_train[idx]
        result = _run(observe_batch(model, x, y, data.info), model)
        truth, item = true_bag(x, data.info)
        metrics = bag_metrics(result.reconstruction.bag, truth, item=item)
        assert metrics["token_recall"] == metrics["token_precision"] == 1.0
        if size == 1:
            assert metrics["token_count_accuracy"] == 1.0
            assert torch.equal(result.reconstruction.tokens, x.long())
