"""Source inference (Hu et al. 2021): which client holds a record, and its challenge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from inference_runs import attack_view, federate

from gradaudit.attacks.source import SourceInferenceAttack, SourceInferenceParams, combine_rounds
from gradaudit.config import Scenario
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.data.base import Dataset
from gradaudit.data.embedded import tabular_dataset
from gradaudit.seeding import numpy_rng
from gradaudit.threat import AGGREGATE_CLIENT, aggregate_view
from gradaudit.threat.challenge import (
    CHALLENGES,
    SOURCE_PER_CLIENT,
    Challenge,
    ChallengeInputs,
)
from gradaudit.types import TabularSchema

KNOWS = ("architecture", "local_hyperparameters")


def scenario(dataset: str, clients: int, federation: dict, **extra: object) -> Scenario:
    """A scenario built without the registry check (the attack is not registered here)."""
    return Scenario.model_validate(
        {
            "data": {"dataset": dataset, "num_clients": clients},
            "model": {"kind": "tabular_mlp", "params": {"hidden": [32]}},
            "federation": federation,
            "threat": {"knows": list(extra.pop("knows", KNOWS))},
            "attacks": [{"kind": "source_inference"}],
            **extra,
        }
    )


def clustered(per_client: int = 40, clients: int = 4, seed: int = 0) -> tuple[Dataset, list]:
    """Strongly non-IID (pathological label skew, as in Hu et al.'s non-IID setting): client k
    holds only class k, whose records sit around their own centre; the held-out split mixes
    the classes."""
    rng = np.random.default_rng(seed)
    dim = 6
    centres = 1.5 * np.eye(clients, dim)
    x = np.concatenate([c + rng.normal(size=(per_client, dim)) for c in centres])
    y = np.repeat(np.arange(clients), per_client)
    y_test = rng.integers(0, clients, size=20)
    x_test = centres[y_test] + rng.normal(size=(20, dim))
    schema = TabularSchema(
        numeric=tuple(f"f{i}" for i in range(dim)), categorical=(), cardinalities=()
    )
    names = [f"class{k}" for k in range(clients)]
    data = tabular_dataset("synthetic", (x, y, x_test, y_test), schema, names)
    parts = [np.arange(k * per_client, (k + 1) * per_client) for k in range(clients)]
    return data, parts


def accuracy(scores: torch.Tensor, truth: np.ndarray) -> float:
    return float((scores.argmax(dim=1).numpy() == truth).mean())


def run_source(
    sc: Scenario, data: Dataset, parts: list, params: SourceInferenceParams | None = None
) -> tuple[Challenge, object]:
    model, fed = federate(sc, data, parts)
    inputs = ChallengeInputs(sc, data, parts, fed, numpy_rng(sc.seed, "challenge", "source"))
    challenge = CHALLENGES.get("source")(inputs)
    obs = attack_view(sc, data, fed, challenge)
    result = SourceInferenceAttack(params).run(obs, model, rng=torch.Generator())
    return challenge, result


FEDAVG = {"algorithm": "fedavg", "rounds": 3, "local": {"batch_size": 8, "lr": 0.1, "epochs": 5}}


def test_source_challenge_draws_per_client_and_answers_the_owner() -> None:
    data, parts = clustered(per_client=60)
    parts[3] = parts[3][:10]  # a small client: all of its records are candidates
    sc = scenario("synthetic", 4, FEDAVG)
    _, fed = federate(sc, data, parts)
    inputs = ChallengeInputs(sc, data, parts, fed, np.random.default_rng(0))
    challenge = CHALLENGES.get("source")(inputs)
    assert challenge.kind == "choice" and challenge.question == "source"
    assert np.bincount(challenge.truth).tolist() == [SOURCE_PER_CLIENT] * 3 + [10]
    ids = np.array([int(r.split(":")[1]) for r in challenge.record_ids])
    for client, part in enumerate(parts):
        assert set(ids[challenge.truth == client]) <= set(part.tolist())
    assert torch.equal(challenge.public["x"], data.x_train[torch.as_tensor(ids)])
    assert challenge.public["num_clients"] == 4
    assert (challenge.baseline == 0).all()  # the largest client (ties: the first)
    assert challenge.notes  # the small client is mentioned
    capped = scenario("synthetic", 4, FEDAVG, **{"threat": {"candidates": {"members": 5}}})
    inputs = ChallengeInputs(capped, data, parts, fed, np.random.default_rng(0))
    assert np.bincount(CHALLENGES.get("source")(inputs).truth).tolist() == [5] * 4


def test_non_iid_owners_are_found_far_above_the_prior() -> None:
    """The oracle: each client's local model raises its own class everywhere, so the records it
    holds gain most under it; an attack that read the wrong client's column would score ~0."""
    data, parts = clustered()
    challenge, result = run_source(scenario("synthetic", 4, FEDAVG), data, parts)
    assert result.status == "ok"
    scores = result.reconstruction.scores
    assert scores.dtype == torch.float64 and scores.shape == (160, 4)
    assert torch.allclose(scores.exp().sum(dim=1), torch.ones(160, dtype=torch.float64))
    assert accuracy(scores, challenge.truth) > 0.8  # the prior (and chance) is 0.25
    assert result.details["signal"] == ["loss_drop"]
    assert result.details["updates_seen_per_client"] == [3, 3, 3, 3]


def test_iid_clients_that_generalise_leave_only_chance() -> None:
    """The control: breast_cancer split IID among four clients; the model generalises, so a
    record's loss moves alike under every client's model and no owner stands out."""
    data = load_dataset("breast_cancer")
    parts = partition_dataset(
        "iid", {}, data.y_train.numpy(), 4, rng=numpy_rng(0, "partition"), groups=None
    )
    challenge, result = run_source(scenario("breast_cancer", 4, FEDAVG), data, parts)
    assert accuracy(result.reconstruction.scores, challenge.truth) < 0.4  # chance: 0.25


def test_fedsgd_without_the_learning_rate_falls_back_to_gradient_alignment() -> None:
    data, parts = clustered()
    fedsgd = {"algorithm": "fedsgd", "rounds": 4, "local": {"batch_size": 40, "lr": 0.5}}
    sc = scenario("synthetic", 4, fedsgd, knows=("architecture",))
    challenge, result = run_source(sc, data, parts)
    assert result.status == "ok" and result.details["signal"] == ["gradient_alignment"]
    assert accuracy(result.reconstruction.scores, challenge.truth) > 0.5
    forced = SourceInferenceParams(signal="loss_drop")
    _, refused = run_source(sc, data, parts, forced)
    assert refused.status == "not_applicable" and "learning rate" in refused.reason


def test_clients_never_seen_are_never_preferred() -> None:
    drops = torch.tensor([[0.5, -2.0, 0.0], [-1.0, -3.0, 0.0]], dtype=torch.float64)
    scores = combine_rounds(drops, torch.tensor([1, 1, 0]), 1.0)
    assert scores.argmax(dim=1).tolist() == [0, 0]
    assert torch.isfinite(scores).all()
    assert scores[1, 2] == scores[1, 1]  # the unseen client ties with the least likely one


def test_only_the_aggregate_is_not_enough() -> None:
    data, parts = clustered()
    sc = scenario("synthetic", 4, FEDAVG)
    model, fed = federate(sc, data, parts)
    inputs = ChallengeInputs(sc, data, parts, fed, np.random.default_rng(0))
    obs = attack_view(sc, data, fed, CHALLENGES.get("source")(inputs))
    # Under secure aggregation each round's only update is the aggregate, as client -1.
    views = tuple(aggregate_view(v, fed.captures[v.round], data.y_train) for v in obs.history)
    obs = dataclasses.replace(views[0], history=views)
    assert [u.client_id for u in obs.updates] == [AGGREGATE_CLIENT]
    result = SourceInferenceAttack().run(obs, model, rng=torch.Generator())
    assert result.status == "not_applicable" and "aggregate" in result.reason


@pytest.mark.data
def test_heart_disease_hospitals_are_told_apart(shared_data_dir) -> None:
    """Four real hospitals (natural partition): the owner beats the prior clearly."""
    data = load_dataset("heart_disease", shared_data_dir)
    sc = scenario("heart_disease", 4, FEDAVG)
    sc = sc.model_copy(
        update={"data": sc.data.model_copy(update={"partition": {"kind": "natural"}})}
    )
    parts = partition_dataset(
        "natural",
        {},
        data.y_train.numpy(),
        4,
        rng=numpy_rng(0, "partition"),
        groups=data.groups_train,
        dataset="heart_disease",
    )
    challenge, result = run_source(sc, data, parts)
    baseline = float((challenge.baseline == challenge.truth).mean())
    assert accuracy(result.reconstruction.scores, challenge.truth) > baseline + 0.1
