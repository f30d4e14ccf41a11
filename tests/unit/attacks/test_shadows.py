"""Vectorised shadow training equals training each shadow alone with torch.optim."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradaudit.attacks.membership.shadows import (
    balanced_keep,
    epoch_count,
    shadow_epochs,
    shadow_logits,
    train_shadows,
)
from gradaudit.models.mlp import MLP


def _toy(seed: int = 0, n: int = 13) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return MLP(5, 3, [7]), torch.randn(n, 5), torch.randint(3, (n,))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _loop_reference(
    model: nn.Module,
    inits: list[dict[str, torch.Tensor]],
    x: torch.Tensor,
    y: torch.Tensor,
    keep: np.ndarray,
    *,
    optimizer: str,
    lr: float,
    batch_size: int,
    epochs: int,
    seed: int,
) -> list[dict[str, torch.Tensor]]:
    """Each shadow trained alone with torch.optim, on the documented permutations: every epoch,
    shadows in order, one ``rng.permutation`` of its records each (none for an empty shadow)."""
    rng = np.random.default_rng(seed)
    orders: list[list[np.ndarray]] = [[] for _ in keep]
    for _ in range(epochs):
        for s, row in enumerate(keep):
            if row.any():
                orders[s].append(rng.permutation(np.flatnonzero(row)))
    out = []
    for s, init in enumerate(inits):
        net = MLP(5, 3, [7])
        net.load_state_dict(init)
        params = list(net.parameters())
        opt = (
            torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr)
        )
        for order in orders[s]:
            for start in range(0, order.size, batch_size):
                batch = torch.as_tensor(order[start : start + batch_size])
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
                opt.step()
        out.append({k: v.detach() for k, v in net.named_parameters()})
    return out


@pytest.mark.parametrize(("optimizer", "lr"), [("sgd", 0.3), ("adam", 0.02)])
def test_vectorised_shadows_equal_torch_optim_per_shadow(optimizer: str, lr: float) -> None:
    model, x, y = _toy()
    keep = np.zeros((3, 13), dtype=bool)
    keep[0, [0, 2, 3, 5, 8]] = True  # 5 records: 2 batches of 3 per epoch (the last short)
    keep[1, :11] = True  # 11 records: 4 batches, so shadow 0 idles in steps 3 and 4
    keep[2, [1, 4, 6, 7, 9, 10, 12]] = True
    inits = [_state(model)]
    for seed in (1, 2):
        torch.manual_seed(seed)
        inits.append(_state(MLP(5, 3, [7])))
    stacked = train_shadows(
        model,
        inits,
        x,
        y,
        keep,
        optimizer=optimizer,  # type: ignore[arg-type]
        lr=lr,
        batch_size=3,
        epochs=4,
        rng=np.random.default_rng(7),
    )
    expected = _loop_reference(
        model, inits, x, y, keep, optimizer=optimizer, lr=lr, batch_size=3, epochs=4, seed=7
    )
    for s, reference in enumerate(expected):
        for key, value in reference.items():
            assert torch.allclose(stacked[key][s], value, atol=1e-5), (s, key)
        moved = max(float((reference[k] - inits[s][k]).abs().max()) for k in reference)
        assert moved > 1e-2  # the comparison is not between untrained models


def test_shadows_share_one_initial_state_and_empty_shadow_stays_there() -> None:
    model, x, y = _toy()
    keep = np.zeros((2, 13), dtype=bool)
    keep[0, :6] = True
    init = _state(model)
    stacked = train_shadows(
        model,
        init,
        x,
        y,
        keep,
        optimizer="adam",
        lr=0.01,
        batch_size=4,
        epochs=2,
        rng=np.random.default_rng(0),
    )
    assert set(stacked) == {k for k, _ in model.named_parameters()}
    for key, value in stacked.items():
        assert value.shape == (2, *init[key].shape)
        assert torch.equal(value[1], init[key])
    assert not torch.equal(stacked["head.weight"][0], init["head.weight"])


def test_steps_give_every_shadow_exactly_that_many_steps() -> None:
    keep = np.zeros((3, 12), dtype=bool)
    keep[0, :4] = True  # 2 batches per epoch: 3 epochs for 5 steps
    keep[1, :9] = True  # 3 batches per epoch: 2 epochs
    plans = list(
        shadow_epochs(keep, batch_size=3, epochs=None, steps=5, rng=np.random.default_rng(0))
    )
    assert len(plans) == 3 == epoch_count(keep, batch_size=3, epochs=None, steps=5)
    taken = sum(p.active.sum(dim=0) for p in plans)
    assert taken.tolist() == [5, 5, 0]
    for plan in plans:
        real = plan.weight.sum(dim=2)
        assert torch.equal(real > 0, plan.active)
        assert float(real.max()) <= 3


def test_each_epoch_visits_every_record_of_a_shadow_once() -> None:
    keep = balanced_keep(4, 10, np.random.default_rng(3))
    (plan,) = shadow_epochs(keep, batch_size=4, epochs=1, steps=None, rng=np.random.default_rng(1))
    for s, row in enumerate(keep):
        seen = plan.index[:, s][plan.weight[:, s] > 0]
        assert sorted(seen.tolist()) == np.flatnonzero(row).tolist()


def test_balanced_keep_puts_every_record_in_half_the_shadows() -> None:
    keep = balanced_keep(6, 50, np.random.default_rng(0))
    assert keep.shape == (6, 50)
    assert (keep.sum(axis=0) == 3).all()
    assert abs(int(keep.sum(axis=1).mean()) - 25) <= 1
    assert (balanced_keep(5, 20, np.random.default_rng(0)).sum(axis=0) == 2).all()


def test_shadow_logits_equal_each_shadow_run_alone() -> None:
    model, x, y = _toy()
    keep = balanced_keep(3, 13, np.random.default_rng(0))
    stacked = train_shadows(
        model,
        _state(model),
        x,
        y,
        keep,
        optimizer="sgd",
        lr=0.1,
        batch_size=5,
        epochs=2,
        rng=np.random.default_rng(0),
    )
    logits = shadow_logits(model, stacked, x, chunk=4)
    assert logits.shape == (3, 13, 3)
    for s in range(3):
        net = MLP(5, 3, [7])
        net.load_state_dict({k: v[s] for k, v in stacked.items()})
        with torch.no_grad():
            assert torch.allclose(logits[s], net(x), atol=1e-6)


def test_batchnorm_is_refused() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="BatchNorm"):
        train_shadows(
            model,
            _state(model),
            torch.randn(6, 5),
            torch.zeros(6, dtype=torch.long),
            np.ones((2, 6), dtype=bool),
            optimizer="sgd",
            lr=0.1,
            batch_size=2,
            epochs=1,
            rng=np.random.default_rng(0),
        )


def test_exactly_one_of_epochs_and_steps() -> None:
    keep = np.ones((1, 4), dtype=bool)
    with pytest.raises(ValueError, match="exactly one"):
        next(shadow_epochs(keep, batch_size=2, epochs=1, steps=1, rng=np.random.default_rng(0)))
