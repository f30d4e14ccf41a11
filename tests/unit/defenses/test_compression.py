"""Compression defenses (topk, random_sparsify, quantize): oracles, wire sizes, and a federation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from gradaudit.config import ComponentSpec, FederationSpec
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.defenses import CLIENT_DEFENSES, build_client_defenses
from gradaudit.defenses.base import HEURISTIC, DefenseContext, LocalData
from gradaudit.defenses.client.compression import (
    QuantizeParams,
    RandomSparsifyParams,
    TopKParams,
    kept_count,
    qsgd_bytes,
    sign_bytes,
    sparse_bytes,
)
from gradaudit.errors import ConfigError
from gradaudit.federation import run_federation
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator
from gradaudit.types import ClientUpdate

LOCAL = LocalData(nn.Linear(1, 1), {}, torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
"""The client's private view; these defenses never read it."""

SIGMAS = 5.0
"""Statistical tolerance of the unbiasedness oracles, in standard errors of the mean."""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _context(task, model: nn.Module | None = None, rounds: int = 1) -> DefenseContext:
    model = model or nn.Linear(2, 2)
    return DefenseContext(model, FederationSpec(rounds=rounds), (10,) * 4, task)


def _build(kind: str, params: dict, context: DefenseContext):
    return CLIENT_DEFENSES.get(kind)(CLIENT_DEFENSES.parse_params(kind, params), context)


def _update(**tensors: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(0, 1, "gradient", dict(tensors), 8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- topk -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [1.0, 0.8, 0.25, 0.01])
def test_topk_keeps_exactly_the_largest_entries(digits, fraction: float) -> None:
    # Prepare: no zeros and no ties in a seeded normal tensor
    w = torch.randn(7, 13, generator=_gen(0))
    topk = _build("topk", {"fraction": fraction}, _context(digits.info))
    # Execute
    out = topk.transform(_update(w=w), rng=_gen(1), local=LOCAL).tensors["w"]
    # Assert: ceil(fraction * 91) entries, unchanged, each larger than every dropped one
    kept = out != 0
    assert int(kept.sum()) == math.ceil(round(fraction * w.numel(), 6))
    assert torch.equal(out[kept], w[kept])
    if not kept.all():
        assert w[kept].abs().min() > w[~kept].abs().max()


def test_topk_scope_per_tensor_or_global(digits) -> None:
    update = _update(a=torch.tensor([10.0, -9.0, 8.0]), b=torch.tensor([1.0, -2.0, 3.0]))
    per_tensor = _build("topk", {"fraction": 0.5}, _context(digits.info))
    joint = _build("topk", {"fraction": 0.5, "scope": "global"}, _context(digits.info))
    out = per_tensor.transform(update, rng=_gen(0), local=LOCAL).tensors
    assert out["a"].tolist() == [10.0, -9.0, 0.0] and out["b"].tolist() == [0.0, -2.0, 3.0]
    out = joint.transform(update, rng=_gen(0), local=LOCAL).tensors
    assert out["a"].tolist() == [10.0, -9.0, 8.0] and out["b"].tolist() == [0.0, 0.0, 0.0]


def test_topk_wire_bytes_choose_indices_or_bitmap(digits) -> None:
    update = _update(
        w=torch.randn(1000, generator=_gen(0)),
        b=torch.randn(10, generator=_gen(1)),
        steps=torch.tensor(3, dtype=torch.int64),
    )
    few = _build("topk", {"fraction": 0.01}, _context(digits.info))
    many = _build("topk", {"fraction": 0.5}, _context(digits.info))
    # 10 of 1000 by index (80 < 40 + 125); 1 of 10 by bitmap (4 + 2 < 8); 8 dense int64 bytes
    assert few.transform(update, rng=_gen(0), local=LOCAL).size_bytes == 80 + 6 + 8
    # 500 of 1000 and 5 of 10 by bitmap
    assert many.transform(update, rng=_gen(0), local=LOCAL).size_bytes == 2125 + 22 + 8
    assert sparse_bytes(10, 1000) == 80 and kept_count(0.7, 10) == 7


# --- random_sparsify --------------------------------------------------------------------------


def test_random_sparsify_is_unbiased_and_keeps_scaled_entries(digits) -> None:
    # Prepare
    p, draws = 0.3, 2000
    v = torch.randn(50, generator=_gen(0), dtype=torch.float64)
    sparsify = _build("random_sparsify", {"fraction": p}, _context(digits.info))
    # Execute: independent generators, as the round loop passes per client and round
    outs = []
    for i in range(draws):
        sent = sparsify.transform(_update(v=v), rng=_gen(100 + i), local=LOCAL)
        kept = sent.tensors["v"] != 0
        assert sent.size_bytes == sparse_bytes(int(kept.sum()), 50, 8)
        outs.append(sent.tensors["v"])
    out = torch.stack(outs)
    # Assert: every kept entry is v / p exactly
    kept = out != 0
    torch.testing.assert_close(out[kept], (v / p).expand_as(out)[kept], rtol=0, atol=0)
    # each entry is v/p with probability p, else 0: mean v, variance v^2 (1/p - 1)
    standard_error = v.abs() * math.sqrt((1 / p - 1) / draws)
    assert ((out.mean(0) - v).abs() <= SIGMAS * standard_error).all()
    # the kept share is binomial(draws * 50, p)
    trials = kept.numel()
    assert abs(kept.float().mean().item() - p) <= SIGMAS * math.sqrt(p * (1 - p) / trials)


def test_random_sparsify_draws_only_from_its_generator(digits) -> None:
    sparsify = _build("random_sparsify", {"fraction": 0.5}, _context(digits.info))
    update = _update(v=torch.randn(64, generator=_gen(0)))
    first = sparsify.transform(update, rng=_gen(7), local=LOCAL).tensors["v"]
    torch.manual_seed(12345)  # the global stream must not matter
    again = sparsify.transform(update, rng=_gen(7), local=LOCAL).tensors["v"]
    other = sparsify.transform(update, rng=_gen(8), local=LOCAL).tensors["v"]
    assert torch.equal(first, again) and not torch.equal(first, other)


# --- quantize ---------------------------------------------------------------------------------


def test_qsgd_is_unbiased_and_on_its_levels(digits) -> None:
    # Prepare: 2 bits, s = 3 levels of the norm
    bits, draws = 2, 2000
    levels = 2**bits - 1
    v = torch.randn(40, generator=_gen(0), dtype=torch.float64)
    norm = v.norm()
    qsgd = _build("quantize", {"bits": bits}, _context(digits.info))
    # Execute
    out = torch.stack(
        [
            qsgd.transform(_update(v=v), rng=_gen(100 + i), local=LOCAL).tensors["v"]
            for i in range(draws)
        ]
    )
    # Assert: |q| * s / norm is an integer level in [0, s] and the sign is v's
    index = out.abs() * levels / norm
    torch.testing.assert_close(index, index.round(), rtol=0, atol=1e-9)
    assert index.max() <= levels + 1e-9
    assert ((out == 0) | (out.sign() == v.sign())).all()
    # each entry is (norm / s) * (l + Bernoulli): variance <= (norm / s)^2 / 4
    standard_error = norm / (2 * levels * math.sqrt(draws))
    assert ((out.mean(0) - v).abs() <= SIGMAS * standard_error).all()


def test_qsgd_leaves_a_zero_tensor_zero(digits) -> None:
    qsgd = _build("quantize", {}, _context(digits.info))
    out = qsgd.transform(_update(z=torch.zeros(5)), rng=_gen(0), local=LOCAL)
    assert torch.equal(out.tensors["z"], torch.zeros(5))


def test_scaled_sign_is_sign_times_mean_magnitude(digits) -> None:
    sign = _build("quantize", {"method": "sign"}, _context(digits.info))
    v = torch.tensor([2.0, -1.0, 0.0, 3.0])
    out = sign.transform(_update(v=v), rng=_gen(0), local=LOCAL).tensors["v"]
    assert out.tolist() == [1.5, -1.5, 1.5, 1.5]  # zero travels as +; biased: != v


def test_quantize_wire_bytes(digits) -> None:
    update = _update(w=torch.randn(100, generator=_gen(0)), b=torch.randn(10, generator=_gen(1)))
    qsgd = _build("quantize", {}, _context(digits.info))  # default 4 bits
    sign = _build("quantize", {"method": "sign"}, _context(digits.info))
    wide = _build("quantize", {"bits": 16}, _context(digits.info))
    assert qsgd.transform(update, rng=_gen(0), local=LOCAL).size_bytes == 67 + 11
    assert sign.transform(update, rng=_gen(0), local=LOCAL).size_bytes == 17 + 6
    assert wide.transform(update, rng=_gen(0), local=LOCAL).size_bytes == (4 + 213) + (4 + 22)
    assert qsgd_bytes(100, 4) == 67 and sign_bytes(10) == 6


# --- shared contract --------------------------------------------------------------------------

CASES = [
    ("topk", {"fraction": 0.3}),
    ("topk", {"fraction": 0.3, "scope": "global"}),
    ("random_sparsify", {"fraction": 0.3}),
    ("quantize", {"bits": 3}),
    ("quantize", {"method": "sign"}),
]


@pytest.mark.parametrize(("kind", "params"), CASES)
def test_inputs_untouched_and_withheld_and_integer_tensors_pass(digits, kind, params) -> None:
    # Prepare: a sent float tensor, a withheld float tensor, an integer buffer
    tensors = {
        "w": torch.randn(6, 5, generator=_gen(0)),
        "head": torch.randn(4, generator=_gen(1)),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.int64),
    }
    update = ClientUpdate(3, 2, "delta", tensors, 9, withheld=frozenset({"head"}))
    before = {k: v.clone() for k, v in tensors.items()}
    defense = _build(kind, params, _context(digits.info))
    # Execute
    out = defense.transform(update, rng=_gen(5), local=LOCAL)
    # Assert
    assert out is not update and out.tensors is not update.tensors
    for key, value in before.items():
        assert torch.equal(update.tensors[key], value)  # the input is not mutated
    assert torch.equal(out.tensors["head"], before["head"])
    assert torch.equal(out.tensors["bn.num_batches_tracked"], before["bn.num_batches_tracked"])
    assert not torch.equal(out.tensors["w"], before["w"])
    assert out.withheld == {"head"} and (out.client_id, out.round, out.kind) == (3, 2, "delta")
    assert out.size_bytes < 30 * 4 + 8  # below dense w plus the int64, the head not counted


@pytest.mark.parametrize(("kind", "params"), CASES)
def test_describe_states_no_guarantee(digits, kind, params) -> None:
    entry = _build(kind, params, _context(digits.info)).describe()
    assert entry["kind"] == kind and entry["guarantee"] == HEURISTIC == "none (heuristic)"
    assert entry["notes"] and entry["warnings"]
    assert any("no formal guarantee" in w for w in entry["warnings"])
    assert all(entry["params"][k] == v for k, v in params.items())


@pytest.mark.parametrize(
    ("model", "params"),
    [
        (TopKParams, {}),
        (TopKParams, {"fraction": 0}),
        (TopKParams, {"fraction": 1.5}),
        (TopKParams, {"fraction": 0.5, "scope": "layer"}),
        (TopKParams, {"fraction": 0.5, "k": 3}),
        (RandomSparsifyParams, {"fraction": -0.1}),
        (QuantizeParams, {"bits": 0}),
        (QuantizeParams, {"bits": 17}),
        (QuantizeParams, {"method": "int8"}),
        (QuantizeParams, {"method": "sign", "bits": 2}),
    ],
)
def test_bad_params_are_refused(model, params) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(params)


def test_bad_params_name_the_path() -> None:
    with pytest.raises(ConfigError, match="fraction"):
        CLIENT_DEFENSES.parse_params("topk", {"fraction": 2.0}, where="defenses.client[0].params")


# --- in a federation --------------------------------------------------------------------------


def _federate(digits, specs: list[ComponentSpec]):
    """One FedSGD round of 4 clients on digits, round 1 captured."""
    clients = partition_dataset(
        "iid", {}, digits.y_train.numpy(), 4, rng=numpy_rng(0, "p"), groups=None
    )
    model = build_model("mlp", {"hidden": [32]}, digits.info, generator=torch_generator(0, "m"))
    spec = FederationSpec(rounds=1)
    context = DefenseContext(model, spec, tuple(len(c) for c in clients), digits.info)
    defenses = build_client_defenses(specs, context)
    return run_federation(
        model, digits, clients, spec, seed=0, capture_rounds={1}, defenses=defenses
    )


@pytest.fixture(scope="module")
def baseline(digits):
    return _federate(digits, [])


def _pairs(result, baseline):
    """(defended, undefended) updates of the same clients, with the same local batches."""
    plain = {u.client_id: u for u in baseline.captures[1].updates}
    return [(u, plain[u.client_id]) for u in result.captures[1].updates]


def test_topk_in_a_federation_sends_the_largest_tenth(digits, baseline) -> None:
    result = _federate(digits, [ComponentSpec(kind="topk", params={"fraction": 0.1})])
    for sent, plain in _pairs(result, baseline):
        for key, value in sent.tensors.items():
            kept = value != 0
            truth = plain.tensors[key]
            assert int(kept.sum()) <= kept_count(0.1, value.numel())
            assert torch.equal(value[kept], truth[kept])
            if kept.any() and not kept.all():
                assert truth[kept].abs().min() >= truth[~kept].abs().max()
    assert result.cost.bytes_up_per_client < baseline.cost.bytes_up_per_client / 4


def test_random_sparsify_in_a_federation_keeps_a_quarter(digits, baseline) -> None:
    p = 0.25
    result = _federate(digits, [ComponentSpec(kind="random_sparsify", params={"fraction": p})])
    kept_total, trials = 0, 0
    for sent, plain in _pairs(result, baseline):
        for key, value in sent.tensors.items():
            truth = plain.tensors[key]
            kept = value != 0
            torch.testing.assert_close(value[kept], truth[kept] / p)
            kept_total += int(kept.sum())
            trials += int((truth != 0).sum())
    assert abs(kept_total / trials - p) <= SIGMAS * math.sqrt(p * (1 - p) / trials)
    assert result.cost.bytes_up_per_client < baseline.cost.bytes_up_per_client / 2


def test_sign_quantize_in_a_federation_sends_one_bit_per_entry(digits, baseline) -> None:
    result = _federate(digits, [ComponentSpec(kind="quantize", params={"method": "sign"})])
    for sent, plain in _pairs(result, baseline):
        for key, value in sent.tensors.items():
            scale = plain.tensors[key].abs().mean()
            torch.testing.assert_close(value.abs(), scale.expand_as(value))
        assert sent.size_bytes == sum(sign_bytes(v.numel()) for v in sent.tensors.values())
    assert result.cost.bytes_up_per_client < baseline.cost.bytes_up_per_client / 25
