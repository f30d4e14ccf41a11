"""Attribute inference (Fredrikson et al. 2015 on the client's updates) and its challenge."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from inference_runs import attack_view, federate
from sklearn.datasets import load_breast_cancer

from gradaudit.attacks.attribute import (
    AttributeInferenceAttack,
    AttributeInferenceParams,
    answer_index,
)
from gradaudit.config import Scenario
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.data.base import Dataset
from gradaudit.data.embedded import stratified_split, tabular_dataset
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng
from gradaudit.threat.challenge import CHALLENGES, Challenge, ChallengeInputs
from gradaudit.types import AttackResult, Observation, TabularSchema

KNOWS = ("architecture", "local_hyperparameters", "public_data")
FEDAVG = {"algorithm": "fedavg", "rounds": 4, "local": {"batch_size": 8, "lr": 0.1, "epochs": 5}}
SCHEMA = TabularSchema(
    numeric=("a", "b"),
    categorical=("s",),
    cardinalities=(3,),
    categories=(("f", "m", "?"),),
)


def scenario(dataset: str, params: dict, *, clients: int = 4, **threat: object) -> Scenario:
    """A scenario built without the registry check (the attack is not registered here)."""
    return Scenario.model_validate(
        {
            "data": {"dataset": dataset, "num_clients": clients},
            "model": {"kind": "tabular_mlp", "params": {"hidden": [32]}},
            "federation": FEDAVG,
            "threat": {"knows": list(KNOWS), **threat},
            "attacks": [{"kind": "attribute_inference", "params": params}],
        }
    )


def synthetic(rule: str, *, n: int = 240, n_test: int = 300, seed: int = 0) -> Dataset:
    """Rows (a, b, s) with a balanced binary attribute s. ``xor``: the label is s XOR [a > 0],
    which the network learns and no linear predictor from (a, b, label) can untangle;
    ``ignored``: the label is [a > 0] and s is noise the model has no reason to use."""
    rng = np.random.default_rng(seed)

    def rows(count: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = rng.normal(size=count), rng.normal(size=count)
        s = rng.integers(0, 2, size=count)
        y = (s ^ (a > 0)) if rule == "xor" else (a > 0)
        return np.stack([a, b, s.astype(float)], axis=1), y.astype(np.int64)

    x, y = rows(n)
    x_test, y_test = rows(n_test)
    return tabular_dataset("synthetic", (x, y, x_test, y_test), SCHEMA, ["no", "yes"])


def run_attribute(
    sc: Scenario, data: Dataset, parts: list, params: AttributeInferenceParams | None = None
) -> tuple[Challenge, AttackResult, Observation]:
    model, fed = federate(sc, data, parts)
    inputs = ChallengeInputs(sc, data, parts, fed, numpy_rng(sc.seed, "challenge", "attribute"))
    challenge = CHALLENGES.get("attribute")(inputs)
    obs = attack_view(sc, data, fed, challenge)
    result = AttributeInferenceAttack(params).run(obs, model, rng=torch.Generator())
    return challenge, result, obs


def gain(challenge: Challenge, result: AttackResult) -> float:
    guess = result.reconstruction.scores.argmax(dim=1).numpy()
    return float((guess == challenge.truth).mean() - (challenge.baseline == challenge.truth).mean())


def iid(data: Dataset, clients: int = 4) -> list:
    return partition_dataset(
        "iid", {}, data.y_train.numpy(), clients, rng=numpy_rng(0, "partition"), groups=None
    )


def test_the_challenge_hides_the_column_and_keeps_the_truth() -> None:
    data = synthetic("xor")
    sc = scenario("synthetic", {"attribute": "s"})
    parts = iid(data)
    _, fed = federate(sc, data, parts)
    challenge = CHALLENGES.get("attribute")(
        ChallengeInputs(sc, data, parts, fed, np.random.default_rng(0))
    )
    public = challenge.public
    assert challenge.kind == "choice" and public["column"] == 2 and public["name"] == "s"
    assert public["answers"] == ["f", "m"] and public["values"] == [0.0, 1.0]  # "?" is no answer
    assert (public["x"][:, 2] == 0).all()
    ids = np.array([int(r.split(":")[1]) for r in challenge.record_ids])
    assert set(ids) == set(parts[0].tolist())  # FedAvg: the target trained on all it holds
    assert (challenge.truth == data.x_train[torch.as_tensor(ids), 2].numpy()).all()
    assert torch.equal(public["x"][:, :2], data.x_train[torch.as_tensor(ids), :2])
    assert challenge.baseline is not None and challenge.baseline.shape == challenge.truth.shape


def test_records_with_the_attribute_missing_are_left_out() -> None:
    data = synthetic("xor")
    data.x_train[0, 2] = 2.0  # the "?" code
    parts = [np.arange(60), np.arange(60, 240)]
    sc = scenario("synthetic", {"attribute": "s"}, clients=2)
    _, fed = federate(sc, data, parts)
    challenge = CHALLENGES.get("attribute")(
        ChallengeInputs(sc, data, parts, fed, np.random.default_rng(0))
    )
    assert "train:0" not in challenge.record_ids and len(challenge.truth) == 59
    assert "missing" in challenge.notes[0]


def test_the_question_is_checked() -> None:
    data = synthetic("xor")
    parts = iid(data)
    sc = scenario("synthetic", {"attribute": "s"})
    _, fed = federate(sc, data, parts)
    for params, match in [
        ({"attribute": "a"}, "numeric: give its band edges"),
        ({"attribute": "s", "bands": [1.0]}, "categorical"),
        ({"attribute": "zip"}, "not a column"),
        ({"attribute": "a", "bands": [0.0]}, "raw units are known only"),
    ]:
        asked = scenario("synthetic", params)
        with pytest.raises(ValueError, match=match):
            CHALLENGES.get("attribute")(
                ChallengeInputs(asked, data, parts, fed, np.random.default_rng(0))
            )
    with pytest.raises(ValueError, match="ascending"):
        AttributeInferenceParams(attribute="a", bands=(1.0, 0.5))


def test_bands_in_model_units_and_their_edges() -> None:
    data = synthetic("ignored")
    parts = iid(data)
    sc = scenario("synthetic", {"attribute": "a", "bands": [-0.5, 0.5], "units": "model"})
    _, fed = federate(sc, data, parts)
    challenge = CHALLENGES.get("attribute")(
        ChallengeInputs(sc, data, parts, fed, np.random.default_rng(0))
    )
    public = challenge.public
    ids = torch.as_tensor([int(r.split(":")[1]) for r in challenge.record_ids])
    a = data.x_train[ids, 0].numpy()
    assert (challenge.truth == (a >= -0.5).astype(int) + (a >= 0.5)).all()
    low, mid, high = public["values"]
    assert low < -0.5 <= mid < 0.5 <= high  # per band, the public median inside it
    assert (public["x"][:, 0] == 0).all()
    assert answer_index(np.array([0.5 - 1e-7]), public).tolist() == [2]  # float32 at the edge


def test_an_attribute_the_model_relies_on_is_inferred_beyond_the_baseline() -> None:
    """The oracle: the label is s XOR [a > 0]. The public linear predictor cannot untangle it
    (near chance); the client's local model can, and the attack reads it off the model."""
    data = synthetic("xor")
    challenge, result, _ = run_attribute(scenario("synthetic", {"attribute": "s"}), data, iid(data))
    assert result.status == "ok" and result.details["signal"] == "loss"
    scores = result.reconstruction.scores
    assert scores.dtype == torch.float64 and scores.shape == (60, 2)
    assert torch.isfinite(scores).all()
    assert gain(challenge, result) > 0.25


def test_an_attribute_the_model_ignores_gives_no_gain() -> None:
    """The control: s is noise for the label; the model's evidence is flat and the attack
    falls back on the public prior, so it does no better than the baseline."""
    data = synthetic("ignored")
    challenge, result, _ = run_attribute(scenario("synthetic", {"attribute": "s"}), data, iid(data))
    assert abs(gain(challenge, result)) <= 0.12


def test_signals_and_refusals() -> None:
    data = synthetic("xor")
    parts = iid(data)
    sc = scenario("synthetic", {"attribute": "s"})
    _, result, obs = run_attribute(
        sc, data, parts, AttributeInferenceParams(signal="loss_drop", prior="none")
    )
    assert result.status == "ok" and result.details["prior"] == "none"
    model = build_model(sc.model.kind, sc.model.params, data.info, generator=torch.Generator())
    aggregate_only = dataclasses.replace(
        obs, updates=(), history=tuple(dataclasses.replace(v, updates=()) for v in obs.history)
    )
    refused = AttributeInferenceAttack().run(aggregate_only, model, rng=torch.Generator())
    assert refused.status == "not_applicable" and "aggregate" in refused.reason
    no_question = dataclasses.replace(obs, side_info={"architecture": True})
    assert "no attribute question" in AttributeInferenceAttack().applicable(no_question)


def test_breast_cancer_scale_is_recovered_exactly() -> None:
    """The recomputed standardisation maps the stored columns back to the raw values."""
    data = load_dataset("breast_cancer")
    bunch = load_breast_cancer()
    train, _ = stratified_split(np.asarray(bunch.target))
    mean, std = data.info.tabular.raw_scale("mean radius")
    raw = data.x_train[:, 0].double().numpy() * std + mean
    assert np.allclose(raw, bunch.data[train, 0], atol=1e-4)


@pytest.mark.data
def test_heart_disease_age_bands_follow_the_raw_ages(shared_data_dir) -> None:
    data = load_dataset("heart_disease", shared_data_dir)
    mean, std = data.info.tabular.raw_scale("age")
    ages = data.x_train[:, 0].double().numpy() * std + mean
    assert np.allclose(ages, np.round(ages), atol=1e-3)  # whole years again
    parts = partition_dataset(
        "natural",
        {},
        data.y_train.numpy(),
        4,
        rng=numpy_rng(0, "partition"),
        groups=data.groups_train,
        dataset="heart_disease",
    )
    sc = scenario("heart_disease", {"attribute": "age", "bands": [50, 60]})
    sc = sc.model_copy(update={"data": sc.data.model_copy(update={"data_dir": shared_data_dir})})
    challenge, result, _ = run_attribute(sc, data, parts)
    ids = [int(r.split(":")[1]) for r in challenge.record_ids]
    years = np.round(ages[ids])
    assert (challenge.truth == (years >= 50).astype(int) + (years >= 60)).all()
    assert challenge.public["answers"] == ["< 50", "50 to < 60", ">= 60"]
    assert result.status == "ok" and result.reconstruction.scores.shape == (len(ids), 3)
