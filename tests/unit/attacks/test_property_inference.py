"""Property inference (Melis et al. 2019) on observed updates, and its challenge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from inference_runs import attack_view, federate
from sklearn.metrics import roc_auc_score

from gradaudit.attacks.property import (
    PropertyInferenceAttack,
    PropertyInferenceParams,
    feature_keys,
    has_property,
)
from gradaudit.config import Scenario
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.data.base import Dataset
from gradaudit.data.embedded import tabular_dataset
from gradaudit.seeding import numpy_rng
from gradaudit.threat.challenge import CHALLENGES, Challenge, ChallengeInputs
from gradaudit.types import AttackResult, Observation, TabularSchema

KNOWS = ("architecture", "local_hyperparameters", "public_data")
FEDSGD = {"algorithm": "fedsgd", "rounds": 8, "local": {"batch_size": 16, "lr": 0.1}}
SCHEMA = TabularSchema(numeric=("a", "b", "c"), categorical=(), cardinalities=())


def scenario(
    dataset: str, params: dict, *, federation: dict = FEDSGD, knows: tuple = KNOWS, **data: object
) -> Scenario:
    """A scenario built without the registry check (the attack is not registered here)."""
    return Scenario.model_validate(
        {
            "data": {"dataset": dataset, "num_clients": 4, **data},
            "model": {"kind": "tabular_mlp", "params": {"hidden": [32]}},
            "federation": federation,
            "threat": {"knows": list(knows)},
            "attacks": [{"kind": "property_inference", "params": params}],
        }
    )


def shifted(per_client: int = 60, seed: int = 0) -> tuple[Dataset, list]:
    """Four clients whose column ``a`` is centred at -1, 0, 0.5 and 1.5 (so batches differ in
    their share of a > 1); the label is [b + c > 0], unrelated to the property. The public
    split spreads a over all four."""
    rng = np.random.default_rng(seed)
    centres = (-1.0, 0.0, 0.5, 1.5)

    def rows(centre: float, count: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(count, 3))
        x[:, 0] += centre
        return x, (x[:, 1] + x[:, 2] > 0).astype(np.int64)

    train = [rows(c, per_client) for c in centres]
    test = [rows(c, 50) for c in centres]
    data = tabular_dataset(
        "synthetic",
        (
            np.concatenate([x for x, _ in train]),
            np.concatenate([y for _, y in train]),
            np.concatenate([x for x, _ in test]),
            np.concatenate([y for _, y in test]),
        ),
        SCHEMA,
        ["no", "yes"],
    )
    return data, [np.arange(k * per_client, (k + 1) * per_client) for k in range(4)]


def run_property(
    sc: Scenario, data: Dataset, parts: list, params: PropertyInferenceParams | None = None
) -> tuple[Challenge, AttackResult, Observation, torch.nn.Module]:
    model, fed = federate(sc, data, parts)
    inputs = ChallengeInputs(sc, data, parts, fed, numpy_rng(sc.seed, "challenge", "property"))
    challenge = CHALLENGES.get("property")(inputs)
    obs = attack_view(sc, data, fed, challenge)
    attack = PropertyInferenceAttack(params)
    return challenge, attack.run(obs, model, rng=torch.Generator().manual_seed(0)), obs, model


COLUMN = {"property": "column", "column": "a", "above": 1.0, "units": "model", "min_share": 0.3}


def test_the_challenge_lists_updates_and_reads_the_private_batches() -> None:
    data, parts = shifted()
    sc = scenario("synthetic", COLUMN)
    _, fed = federate(sc, data, parts)
    challenge = CHALLENGES.get("property")(
        ChallengeInputs(sc, data, parts, fed, np.random.default_rng(0))
    )
    public = challenge.public
    assert challenge.kind == "binary" and len(public["updates"]) == 32  # 8 rounds x 4 clients
    assert public["column"] == 0 and public["cut"] == 1.0 and public["label"] is None
    for (rnd, client), truth in zip(public["updates"], challenge.truth, strict=True):
        used = fed.captures[rnd].plans[client].used
        share = float((data.x_train[torch.as_tensor(used), 0] > 1.0).double().mean())
        assert truth == (share >= 0.3)
    assert 0 < challenge.truth.sum() < len(challenge.truth)
    assert challenge.record_ids[0] == "round:1/client:0"


def test_auto_property_and_its_notes() -> None:
    data, parts = shifted()
    sc = scenario("synthetic", {"min_share": 1.0})  # no "age" column: the label property
    _, fed = federate(sc, data, parts)
    challenge = CHALLENGES.get("property")(
        ChallengeInputs(sc, data, parts, fed, np.random.default_rng(0))
    )
    assert challenge.public["label"] == 1 and challenge.public["column"] is None
    assert not challenge.truth.any() and "holds for no observed update" in challenge.notes[0]
    with pytest.raises(ValueError, match="not a numeric column"):
        CHALLENGES.get("property")(
            ChallengeInputs(
                scenario("synthetic", {"property": "column", "column": "zip"}),
                data,
                parts,
                fed,
                np.random.default_rng(0),
            )
        )


def test_has_property_counts_a_value_at_the_cut_as_not_above() -> None:
    x = torch.tensor([[0.69], [0.6904], [0.70]], dtype=torch.float32)
    cut = float(torch.tensor(0.6904, dtype=torch.float64))
    assert has_property({"column": 0, "cut": cut}, x, torch.zeros(3)).tolist() == [
        False,
        False,
        True,
    ]


def test_batches_with_the_property_are_told_apart() -> None:
    """The oracle: FedSGD batches of clients whose share of a > 1 differs; the classifier
    trained on simulated public batches separates them."""
    data, parts = shifted()
    challenge, result, _, _ = run_property(scenario("synthetic", COLUMN), data, parts)
    assert result.status == "ok"
    scores = result.reconstruction.scores
    assert scores.dtype == torch.float64 and scores.shape == (32,)
    assert roc_auc_score(challenge.truth, scores.numpy()) > 0.85
    assert result.details["updates_not_seen"] == 0 and len(result.details["rounds"]) == 8


def test_fedavg_label_share_with_a_random_forest() -> None:
    data, parts = shifted()
    fedavg = {"algorithm": "fedavg", "rounds": 3, "local": {"batch_size": 8, "lr": 0.1, "steps": 2}}
    params = {"property": "label", "label": 1, "min_share": 0.5}
    sc = scenario("synthetic", params, federation=fedavg)
    forest = PropertyInferenceParams(**params, classifier="random_forest", aux_updates=32)
    challenge, result, _, _ = run_property(sc, data, parts, forest)
    assert 0 < challenge.truth.sum() < len(challenge.truth)
    assert roc_auc_score(challenge.truth, result.reconstruction.scores.numpy()) > 0.8


def test_what_the_adversary_must_hold() -> None:
    data, parts = shifted()
    sc = scenario("synthetic", COLUMN)
    _, _, obs, model = run_property(sc, data, parts)
    attack = PropertyInferenceAttack()
    side = dict(obs.side_info)
    for missing, reason in [
        ("public_data", "grant public_data"),
        ("local_hyperparameters", "local hyperparameters"),
        ("architecture", "architecture"),
    ]:
        view = dataclasses.replace(obs, side_info={k: v for k, v in side.items() if k != missing})
        assert reason in attack.applicable(view)
    aggregate_only = dataclasses.replace(
        obs, history=tuple(dataclasses.replace(v, updates=()) for v in obs.history)
    )
    assert "aggregate" in attack.run(aggregate_only, model, rng=torch.Generator()).reason
    one_kind = {**side, "candidates": {**side["candidates"], "cut": 99.0}}
    assert "only without" in attack.applicable(dataclasses.replace(obs, side_info=one_kind))


def test_feature_selection_reads_the_input_layer_or_the_head() -> None:
    data, parts = shifted()
    sc = scenario("synthetic", COLUMN)
    _, _, obs, model = run_property(sc, data, parts)
    update = obs.updates[0]
    assert feature_keys(model, update, "first") == ["body.0.weight", "body.0.bias"]
    assert feature_keys(model, update, "last") == ["head.weight", "head.bias"]
    assert len(feature_keys(model, update, "all")) == 4


@pytest.mark.data
def test_heart_disease_patients_over_60(shared_data_dir) -> None:
    """Real data: four hospitals, FedSGD batches of 16; does a batch hold >= 30 % over-60s?"""
    data = load_dataset("heart_disease", shared_data_dir)
    parts = partition_dataset(
        "natural",
        {},
        data.y_train.numpy(),
        4,
        rng=numpy_rng(0, "partition"),
        groups=data.groups_train,
        dataset="heart_disease",
    )
    federation = {"algorithm": "fedsgd", "rounds": 20, "local": {"batch_size": 16, "lr": 0.1}}
    sc = scenario(
        "heart_disease", {"min_share": 0.3}, federation=federation, data_dir=str(shared_data_dir)
    )
    challenge, result, _, _ = run_property(sc, data, parts)
    assert challenge.public["name"] == "age" and "age > 60" in challenge.public["property"]
    assert 0 < challenge.truth.sum() < len(challenge.truth)
    assert roc_auc_score(challenge.truth, result.reconstruction.scores.numpy()) > 0.55
