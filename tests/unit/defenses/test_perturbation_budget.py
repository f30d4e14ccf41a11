"""dct_mask (frequency-domain low-pass) and update_budget (clip, participation cap)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.fft
import torch
from pydantic import ValidationError
from torch import nn

from gradaudit.config import ComponentSpec, FederationSpec
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.defenses import CLIENT_DEFENSES, build_client_defenses
from gradaudit.defenses.base import HEURISTIC, DefenseContext, LocalData
from gradaudit.defenses.client.budget import UpdateBudgetParams
from gradaudit.defenses.client.perturbation import DctMaskParams, dct_matrix
from gradaudit.errors import ConfigError
from gradaudit.federation import run_federation
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator
from gradaudit.types import ClientUpdate

LOCAL = LocalData(nn.Linear(1, 1), {}, torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
"""The client's private view; these defenses never read it."""

CONV = nn.Conv2d(1, 2, 3)
"""A model with one 3x3 kernel, so that dct_mask accepts it."""


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _context(task, model: nn.Module = CONV, rounds: int = 1) -> DefenseContext:
    return DefenseContext(model, FederationSpec(rounds=rounds), (10,) * 4, task)


def _build(kind: str, params: dict, context: DefenseContext):
    return CLIENT_DEFENSES.get(kind)(CLIENT_DEFENSES.parse_params(kind, params), context)


def _update(withheld: frozenset[str] = frozenset(), **tensors: torch.Tensor) -> ClientUpdate:
    return ClientUpdate(0, 1, "gradient", dict(tensors), 8, withheld=withheld)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dct2(x: torch.Tensor) -> np.ndarray:
    """The oracle: scipy's orthonormal 2-D DCT-II over the last two dimensions."""
    return scipy.fft.dctn(x.double().numpy(), axes=(-2, -1), norm="ortho")


def _kernel(seed: int = 0, shape: tuple[int, ...] = (12, 3, 5, 5)) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _dct_mask(digits, keep: float, linear: bool = False):
    return _build("dct_mask", {"keep": keep, "linear": linear}, _context(digits.info))


# --- dct_mask ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_dct_matrix_is_scipys_orthonormal_dct(n: int) -> None:
    x = np.random.default_rng(n).normal(size=(4, n))
    ours = (torch.from_numpy(x) @ dct_matrix(n).T).numpy()
    np.testing.assert_allclose(ours, scipy.fft.dct(x, axis=-1, norm="ortho"), atol=1e-12)


def test_dct_mask_with_keep_one_returns_the_input(digits) -> None:
    w = _kernel()
    out = _dct_mask(digits, 1.0).transform(_update(w=w), rng=_gen(0), local=LOCAL)
    torch.testing.assert_close(out.tensors["w"], w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep", [0.01, 0.3, 1.0])
def test_a_constant_kernel_survives_any_keep(digits, keep: float) -> None:
    # pure DC: each (out, in) slice is one constant
    w = torch.randn(12, 3, 1, 1, generator=_gen(1)).expand(12, 3, 5, 5).contiguous()
    out = _dct_mask(digits, keep).transform(_update(w=w), rng=_gen(0), local=LOCAL)
    torch.testing.assert_close(out.tensors["w"], w, rtol=0, atol=1e-6)


def test_energy_grows_with_keep_and_never_exceeds_the_input(digits) -> None:
    w = _kernel(2)
    energies = [
        float(
            _dct_mask(digits, keep)
            .transform(_update(w=w), rng=_gen(0), local=LOCAL)
            .tensors["w"]
            .double()
            .square()
            .sum()
        )
        for keep in np.linspace(0.04, 1.0, 13)
    ]
    assert all(a <= b * (1 + 1e-6) for a, b in itertools.pairwise(energies))
    assert energies[0] < energies[-1] <= float(w.double().square().sum()) * (1 + 1e-6)


def test_dct_mask_keeps_exactly_the_lowest_frequencies(digits) -> None:
    # Prepare: 3 of 25 coefficients are the u + v <= 1 diagonal
    w = _kernel(3)
    # Execute
    out = _dct_mask(digits, 3 / 25).transform(_update(w=w), rng=_gen(0), local=LOCAL)
    # Assert with scipy as the oracle
    got, truth = _dct2(out.tensors["w"]), _dct2(w)
    u, v = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    low = u + v <= 1
    np.testing.assert_allclose(got[..., low], truth[..., low], atol=1e-5)
    np.testing.assert_allclose(got[..., ~low], 0.0, atol=1e-5)


def test_dct_mask_linear_option_filters_the_input_dimension(digits) -> None:
    lin = torch.randn(6, 10, generator=_gen(4))
    plain = _dct_mask(digits, 0.3).transform(_update(lin=lin), rng=_gen(0), local=LOCAL)
    assert torch.equal(plain.tensors["lin"], lin)  # linear off: 2-D weights pass
    out = _dct_mask(digits, 0.3, linear=True).transform(_update(lin=lin), rng=_gen(0), local=LOCAL)
    got = scipy.fft.dct(out.tensors["lin"].double().numpy(), axis=-1, norm="ortho")
    truth = scipy.fft.dct(lin.double().numpy(), axis=-1, norm="ortho")
    np.testing.assert_allclose(got[:, :3], truth[:, :3], atol=1e-5)
    np.testing.assert_allclose(got[:, 3:], 0.0, atol=1e-5)
    assert out.size_bytes == 6 * 3 * 4


def test_dct_mask_leaves_other_tensors_and_counts_sent_coefficients(digits) -> None:
    # Prepare: a 5x5 kernel, a 1x1 kernel, a bias, a withheld kernel, an integer buffer
    tensors = {
        "conv.weight": _kernel(5),
        "point.weight": torch.randn(4, 3, 1, 1, generator=_gen(6)),
        "conv.bias": torch.randn(12, generator=_gen(7)),
        "head.weight": _kernel(8, (2, 2, 3, 3)),
        "bn.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }
    before = {k: v.clone() for k, v in tensors.items()}
    update = _update(frozenset({"head.weight"}), **tensors)
    # Execute
    out = _dct_mask(digits, 0.12).transform(update, rng=_gen(0), local=LOCAL)
    # Assert: only the 5x5 kernel changes; the input is not mutated
    for key, value in before.items():
        assert torch.equal(tensors[key], value)
        assert torch.equal(out.tensors[key], value) == (key != "conv.weight")
    assert out.withheld == {"head.weight"}
    # 12 * 3 kernels x 3 coefficients, plus the 1x1 kernel, the bias and the int64 dense
    assert out.size_bytes == 12 * 3 * 3 * 4 + 12 * 4 + 12 * 4 + 8


def test_dct_mask_refuses_a_model_it_would_not_change(digits) -> None:
    mlp = build_model("mlp", {"hidden": [8]}, digits.info, generator=torch_generator(0, "m"))
    context = _context(digits.info, model=mlp)
    with pytest.raises(ConfigError, match="linear: true"):
        build_client_defenses([ComponentSpec(kind="dct_mask", params={"keep": 0.5})], context)
    stack = build_client_defenses(
        [ComponentSpec(kind="dct_mask", params={"keep": 0.5, "linear": True})], context
    )
    entry = stack.defenses[0].describe()
    assert entry["guarantee"] == HEURISTIC and entry["warnings"]
    assert entry["notes"][1] == "filtered tensors: body.0.weight, head.weight"


# --- update_budget ----------------------------------------------------------------------------


def test_budget_clips_the_joint_norm_of_sent_float_tensors(digits) -> None:
    # Prepare: sent norm 5 (3 and 4 in two tensors); a large withheld tensor; an integer buffer
    update = _update(
        frozenset({"head"}),
        a=torch.tensor([3.0]),
        b=torch.tensor([4.0]),
        head=torch.tensor([100.0]),
        steps=torch.tensor(2, dtype=torch.int64),
    )
    tight = _build("update_budget", {"max_norm": 1.0}, _context(digits.info))
    loose = _build("update_budget", {"max_norm": 10.0}, _context(digits.info))
    # Execute
    out = tight.transform(update, rng=_gen(0), local=LOCAL)
    same = loose.transform(update, rng=_gen(0), local=LOCAL)
    # Assert
    torch.testing.assert_close(out.tensors["a"], torch.tensor([0.6]))
    torch.testing.assert_close(out.tensors["b"], torch.tensor([0.8]))
    assert out.tensors["head"].item() == 100.0 and out.tensors["steps"].item() == 2
    assert update.tensors["a"].item() == 3.0  # the input is not mutated
    assert all(torch.equal(same.tensors[k], update.tensors[k]) for k in update.tensors)
    assert out.size_bytes == update.size_bytes and out.wire_bytes is None


def test_budget_counts_participation_when_it_admits(digits) -> None:
    budget = _build("update_budget", {"max_rounds": 2}, _context(digits.info, rounds=5))
    assert budget.admits(0, 1) and budget.admits(0, 1)  # asking twice counts once
    assert budget.admits(1, 1)
    assert budget.admits(0, 3)
    assert not budget.admits(0, 4) and not budget.admits(0, 5)
    assert budget.admits(1, 5) and not budget.admits(1, 6)
    assert budget.declined == 3
    assert "3 request(s) declined" in " ".join(budget.describe()["notes"])
    clip_only = _build("update_budget", {"max_norm": 1.0}, _context(digits.info))
    assert all(clip_only.admits(0, r) for r in range(1, 10))


def test_budget_describe_warns_when_the_cap_cannot_bind(digits) -> None:
    budget = _build("update_budget", {"max_rounds": 3}, _context(digits.info, rounds=3))
    entry = budget.describe()
    assert entry["kind"] == "update_budget" and entry["guarantee"] == "none (heuristic)"
    assert entry["params"] == {"max_norm": None, "max_rounds": 3}
    assert any("never binds" in w for w in entry["warnings"])
    assert any("not differential privacy" in w for w in entry["warnings"])


@pytest.mark.parametrize(
    ("model", "params"),
    [
        (UpdateBudgetParams, {}),
        (UpdateBudgetParams, {"max_norm": 0}),
        (UpdateBudgetParams, {"max_rounds": 0}),
        (UpdateBudgetParams, {"max_rounds": 2, "noise": 1.0}),
        (DctMaskParams, {}),
        (DctMaskParams, {"keep": 0}),
        (DctMaskParams, {"keep": 1.01}),
        (DctMaskParams, {"keep": 0.5, "mode": "high"}),
    ],
)
def test_bad_params_are_refused(model, params) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(params)


# --- in a federation --------------------------------------------------------------------------


def _federate(digits, kind: str, specs: list[ComponentSpec], spec: FederationSpec):
    clients = partition_dataset(
        "iid", {}, digits.y_train.numpy(), 4, rng=numpy_rng(0, "p"), groups=None
    )
    params = {"hidden": [32]} if kind == "mlp" else {}
    model = build_model(kind, params, digits.info, generator=torch_generator(0, "m"))
    context = DefenseContext(model, spec, tuple(len(c) for c in clients), digits.info)
    defenses = build_client_defenses(specs, context)
    return run_federation(
        model,
        digits,
        clients,
        spec,
        seed=0,
        capture_rounds=set(range(1, spec.rounds + 1)),
        defenses=defenses,
    )


def test_dct_mask_in_a_federation_low_passes_lenet_kernels(digits) -> None:
    # Prepare: LeNet's 5x5 kernels; keep 5 of 25 coefficients (u + v <= 1, then 2 of u + v = 2)
    spec = FederationSpec(rounds=1)
    plain = _federate(digits, "lenet", [], spec)
    # Execute
    result = _federate(
        digits, "lenet", [ComponentSpec(kind="dct_mask", params={"keep": 0.2})], spec
    )
    # Assert
    truth = {u.client_id: u for u in plain.captures[1].updates}
    for sent in result.captures[1].updates:
        for key, value in sent.tensors.items():
            original = truth[sent.client_id].tensors[key]
            if value.dim() != 4:
                assert torch.equal(value, original)  # biases and the head travel unchanged
                continue
            got, want = _dct2(value), _dct2(original)
            assert (np.abs(got) > 1e-6).reshape(-1, 25).sum(1).max() <= 5
            low = np.add.outer(np.arange(5), np.arange(5)) <= 1
            np.testing.assert_allclose(got[..., low], want[..., low], atol=1e-5)
    assert result.cost.bytes_up_per_client < plain.cost.bytes_up_per_client / 3


def test_update_budget_in_a_federation_clips_and_declines(digits) -> None:
    # Prepare: 2 of 4 clients a round for 4 rounds, each client at most once
    spec = FederationSpec(rounds=4, clients_per_round=2)
    params = {"max_norm": 0.05, "max_rounds": 1}
    # Execute
    result = _federate(digits, "mlp", [ComponentSpec(kind="update_budget", params=params)], spec)
    # Assert: a client sampled again declines; every sent update is clipped to the cap
    seen: set[int] = set()
    for record in result.rounds:
        assert set(record.declined) == set(record.sampled) & seen
        sent = result.captures[record.round].updates
        assert {u.client_id for u in sent} == set(record.sampled) - seen
        seen |= {u.client_id for u in sent}
        for update in sent:  # undefended norms are about 1.4: the cap binds
            norm = torch.cat([t.reshape(-1) for t in update.tensors.values()]).norm()
            assert float(norm) == pytest.approx(0.05, rel=1e-5)
    assert any(record.declined for record in result.rounds)
