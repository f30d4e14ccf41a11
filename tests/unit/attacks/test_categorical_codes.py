"""categorical_codes: the codes present in a batch are exact on an exact update, for both
encodings; counts are exact where forced; noise, FedAvg and missing inputs behave as documented."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from gradaudit.attacks import ATTACKS, build_attack
from gradaudit.attacks.inversion.codes import (
    CategoricalCodesAttack,
    CategoricalCodesParams,
    code_counts,
    code_signal_keys,
)
from gradaudit.errors import ConfigError
from gradaudit.metrics.bag import bag_metrics, true_bag
from gradaudit.models import build_model
from gradaudit.threat import observe_batch, observe_fedavg
from gradaudit.types import Observation, TabularSchema, TaskInfo

SCHEMA = TabularSchema(
    numeric=("age",),
    categorical=("sex", "icd", "site"),
    cardinalities=(2, 12, 3),
    categories=(("female", "male"), tuple(f"I{i:02d}" for i in range(12)), ("a", "b", "c")),
)
TASK = TaskInfo("toy-icd", "tabular", (4,), 2, None, ("no", "yes"), tabular=SCHEMA)


def _model(encoding: str) -> nn.Module:
    params = {"hidden": [16], "embedding_dim": 5, "encoding": encoding}
    return build_model("tabular_mlp", params, TASK, generator=torch.Generator().manual_seed(0))


def _rows(sex: list[int], icd: list[int], site: list[int]) -> torch.Tensor:
    n = len(sex)
    age = torch.linspace(-1, 1, n)[:, None]
    return torch.cat([age, torch.tensor([sex, icd, site], dtype=torch.float32).T], dim=1)


def _run(obs: Observation, model: nn.Module, **params: object):
    attack = CategoricalCodesAttack(CategoricalCodesParams(**params))  # type: ignore[arg-type]
    return attack.run(obs, model, rng=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("encoding", ["embedding", "onehot"])
def test_present_codes_are_exact_and_forced_counts_too(encoding: str) -> None:
    model = _model(encoding)
    # sex: one code for all 4 rows; icd: 4 distinct codes; site: two codes 3 + 1
    x = _rows([1, 1, 1, 1], [7, 2, 11, 5], [0, 2, 0, 0])
    obs = observe_batch(model, x, torch.tensor([0, 1, 1, 0]), TASK)
    result = _run(obs, model, counts="exact")
    assert result.status == "ok"
    truth, item = true_bag(x, TASK)
    bag = result.reconstruction.bag
    assert set(bag.tolist()) == set(truth.tolist())
    assert result.details["exact_counts"] == ["sex", "icd"]
    assert result.details["codes"] == {
        "sex=male": 4,
        "icd=I02": 1,
        "icd=I05": 1,
        "icd=I07": 1,
        "icd=I11": 1,
        "site=a": 1,  # counts=exact: a present code that is not forced is listed once
        "site=c": 1,
    }
    metrics = bag_metrics(bag, truth, item=item)
    assert metrics["code_recall"] == 1.0 and metrics["code_precision"] == 1.0
    assert metrics["code_count_accuracy"] == pytest.approx(10 / 12)


@pytest.mark.parametrize("encoding", ["embedding", "onehot"])
def test_one_example_gives_the_exact_bag(encoding: str) -> None:
    model = _model(encoding)
    x = _rows([0], [9], [1])
    result = _run(observe_batch(model, x, torch.tensor([1]), TASK), model)
    assert sorted(result.reconstruction.bag.tolist()) == sorted(true_bag(x, TASK)[0].tolist())
    assert result.details["exact_counts"] == ["sex", "icd", "site"]


def test_estimated_counts_sum_to_the_batch_and_keep_every_present_code() -> None:
    model = _model("onehot")
    x = _rows([0, 1, 1, 1, 0, 1], [3, 3, 3, 4, 4, 8], [0, 1, 2, 2, 2, 2])
    result = _run(observe_batch(model, x, torch.tensor([0, 1, 0, 1, 0, 1]), TASK), model)
    codes = result.details["codes"]
    for column in SCHEMA.categorical:
        assert sum(v for k, v in codes.items() if k.startswith(f"{column}=")) == 6
    assert set(codes) == {"sex=female", "sex=male", "icd=I03", "icd=I04", "icd=I08"} | {
        "site=a",
        "site=b",
        "site=c",
    }
    assert all(v >= 1 for v in codes.values())


def test_code_counts_forced_cases() -> None:
    signal = torch.randn(4, 3)
    assert code_counts(signal, torch.tensor([2]), 5)[0].tolist() == [5]
    counts, exact = code_counts(signal, torch.tensor([0, 1, 3]), 3)
    assert counts.tolist() == [1, 1, 1] and exact
    counts, exact = code_counts(signal, torch.tensor([0, 1, 2, 3]), 3)  # noise: more than rows
    assert counts.tolist() == [1, 1, 1, 1] and not exact


def test_fedavg_change_lists_the_codes_of_every_local_batch() -> None:
    model = _model("onehot")
    x = _rows([0, 0, 1, 1], [1, 1, 6, 6], [2, 2, 2, 2])
    obs = observe_fedavg(model, x, torch.tensor([0, 1, 0, 1]), TASK, lr=0.1, batch_size=2)
    result = _run(obs, model)
    assert sorted(set(result.reconstruction.bag.tolist())) == sorted(
        set(true_bag(x, TASK)[0].tolist())
    )
    assert result.details["codes"]["site=c"] == 4


def test_rtol_tolerates_small_noise() -> None:
    model = _model("embedding")
    x = _rows([1, 1], [4, 10], [0, 1])
    obs = observe_batch(model, x, torch.tensor([0, 1]), TASK)
    g = torch.Generator().manual_seed(1)
    noisy = {
        k: v + 1e-6 * torch.randn(v.shape, generator=g) for k, v in obs.updates[0].tensors.items()
    }
    noisy_obs = dataclasses.replace(
        obs, updates=(dataclasses.replace(obs.updates[0], tensors=noisy),)
    )
    truth = set(true_bag(x, TASK)[0].tolist())
    assert set(_run(noisy_obs, model).reconstruction.bag.tolist()) != truth  # all codes
    assert set(_run(noisy_obs, model, rtol=0.01).reconstruction.bag.tolist()) == truth


def test_not_applicable_without_what_it_reads() -> None:
    model = _model("embedding")
    x = _rows([1], [4], [0])
    obs = observe_batch(model, x, torch.tensor([0]), TASK)
    withheld = dataclasses.replace(
        obs,
        updates=(dataclasses.replace(obs.updates[0], withheld=frozenset({"embeddings.1.weight"})),),
    )
    result = _run(withheld, model)
    assert result.status == "not_applicable" and "embeddings.1.weight" in str(result.reason)
    assert code_signal_keys(_model("onehot")) == ["body.0.weight"]
    plain = build_model("mlp", {"hidden": [4]}, TASK, generator=torch.Generator().manual_seed(0))
    assert _run(obs, plain).status == "not_applicable"
    no_codes = TaskInfo(
        "num", "tabular", (1,), 2, None, ("a", "b"), tabular=TabularSchema(("x",), (), ())
    )
    assert "no categorical" in str(_run(dataclasses.replace(obs, task=no_codes), model).reason)
    no_arch = dataclasses.replace(obs, side_info={})
    assert "architecture" in str(_run(no_arch, model).reason)


def test_registered_with_validated_params() -> None:
    assert "categorical_codes" in ATTACKS.names()
    assert isinstance(build_attack("categorical_codes", {"rtol": 0.1}), CategoricalCodesAttack)
    with pytest.raises(ConfigError, match="rtol"):
        build_attack("categorical_codes", {"rtol": 1.5})
