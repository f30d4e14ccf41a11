"""dp_gaussian in the round loop: clipping, noise, engines, accounting, budgets, cohorts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradaudit.config import ComponentSpec, FederationSpec, LocalSpec
from gradaudit.data import load_dataset, partition_dataset
from gradaudit.defenses import build_client_defenses
from gradaudit.defenses.accounting import GaussianRound, epsilon
from gradaudit.defenses.base import DefenseContext, DpSgd, LocalTraining
from gradaudit.errors import ConfigError
from gradaudit.federation import plan_local_batches, run_federation
from gradaudit.federation.local import train_clients_loop, train_clients_vectorised
from gradaudit.models import build_model
from gradaudit.seeding import numpy_rng, torch_generator


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _setup(digits, fed: FederationSpec, dp: dict, *, clients: int = 6, model: str = "mlp"):
    params = {"hidden": [16]} if model == "mlp" else {}
    net = build_model(model, params, digits.info, generator=torch_generator(0, "model"))
    parts = partition_dataset(
        "iid", {}, digits.y_train.numpy(), clients, rng=numpy_rng(0, "partition"), groups=None
    )
    context = DefenseContext(net, fed, tuple(len(p) for p in parts), digits.info, 0)
    stack = build_client_defenses([ComponentSpec(kind="dp_gaussian", params=dp)], context)
    return net, parts, stack


def _norm(update) -> float:
    return float(torch.cat([v.reshape(-1) for v in update.tensors.values()]).norm())


def test_dp_sgd_engines_agree_with_poisson_batches(digits) -> None:
    # Prepare: Poisson batches of unequal clients, DP-SGD with per-client noise multipliers
    net = build_model("mlp", {"hidden": [16]}, digits.info, generator=torch_generator(0, "m"))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    order = np.random.default_rng(1).permutation(len(digits.y_train))
    indices = [order[:13], order[13:40], order[40:45]]
    plans = [
        plan_local_batches(
            c,
            idx,
            algorithm="fedavg",
            batch_size=4,
            epochs=1,
            steps=None,
            rng=numpy_rng(0, "l", c),
            poisson=True,
        )
        for c, idx in enumerate(indices)
    ]
    rules = [LocalTraining(dp_sgd=DpSgd(0.5, 1.0 + c, 4.0), poisson_batches=True) for c in range(3)]

    def run(engine):
        gens = [torch_generator(0, "dp", c) for c in range(3)]
        return engine(
            net,
            state,
            digits.x_train,
            digits.y_train,
            plans,
            algorithm="fedavg",
            lr=0.1,
            rules=rules,
            generators=gens,
        )

    # Execute
    loop, vec = run(train_clients_loop), run(train_clients_vectorised)
    # Check: Poisson batches vary in size; both engines give the same noisy updates
    assert len({len(s) for p in plans for s in p.steps}) > 1
    assert [len(p.steps) for p in plans] == [4, 7, 2]  # epochs * ceil(n / batch)
    for a, b in zip(loop, vec, strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_sample_level_epsilon_is_each_clients_dp_sgd_composition(digits) -> None:
    # Prepare: 2 rounds, every client, FedAvg 1 epoch of batch 8
    fed = FederationSpec(algorithm="fedavg", rounds=2, local=LocalSpec(batch_size=8, epochs=1))
    dp = {"level": "sample", "clip_norm": 1.0, "noise_multiplier": 1.2, "delta": 1e-5}
    net, parts, stack = _setup(digits, fed, dp)
    # Execute
    result = run_federation(net, digits, parts, fed, seed=0, defenses=stack)
    report = stack.defenses[0].privacy()
    # Check: client c composed 2 rounds of ceil(n_c/8) Poisson steps at q = 8/n_c
    expected = []
    for part in parts:
        n = len(part)
        steps = math.ceil(n / 8)
        expected.append(epsilon([GaussianRound(1.2, sample_rate=8 / n, count=2 * steps)], 1e-5))
    assert result.engine == "vectorised"
    assert report.level == "sample"
    assert report.epsilon == pytest.approx(max(expected), rel=1e-9)


def test_client_level_clips_noises_the_sum_and_accounts_with_sampling(digits) -> None:
    # Prepare: 3 of 6 clients per round, server noise
    fed = FederationSpec(
        algorithm="fedavg",
        rounds=3,
        clients_per_round=3,
        local=LocalSpec(batch_size=8, steps=2, lr=0.5),
    )
    dp = {"level": "client", "clip_norm": 0.05, "noise_multiplier": 0.8, "delta": 1e-3}
    net, parts, stack = _setup(digits, fed, dp)
    # Execute
    result = run_federation(net, digits, parts, fed, seed=0, defenses=stack, capture_rounds={2})
    # Check: fixed-size client sampling is accounted under replace-one neighbours
    assert stack.defenses[0].privacy().neighbours == "replace_one"
    # every update the server sees is clipped and noise-free (server noise)
    capture = result.captures[2]
    norms = [_norm(u) for u in capture.updates]
    assert max(norms) <= 0.05 + 1e-6 and min(norms) > 0.049  # all were clipped
    # the aggregate is the noisy sum over the expected cohort of 3
    clean = sum(torch.cat([v.reshape(-1) for v in u.tensors.values()]) for u in capture.updates)
    agg = torch.cat([v.reshape(-1) for v in capture.aggregate.values()])
    noise = agg * 3 - clean
    assert float(noise.std()) == pytest.approx(0.8 * 0.05, rel=0.05)
    # the ledger: 3 rounds of a fixed-size sample of 3 of 6, for every client
    want = epsilon(
        [GaussianRound(0.8, sampling="fixed", sample_size=3, population=6, count=3)],
        1e-3,
        neighbours="replace_one",
    )
    assert stack.defenses[0].privacy().epsilon == pytest.approx(want, rel=1e-9)
    assert stack.defenses[0].privacy().per_client == {}


def test_cohort_clients_are_clipped_tighter_and_get_a_smaller_epsilon(digits) -> None:
    # Prepare: clients 1 and 4 hold genomic data and ask for noise multiplier 3
    fed = FederationSpec(algorithm="fedsgd", rounds=2, local=LocalSpec(batch_size=8, lr=0.1))
    dp = {
        "level": "client",
        "clip_norm": 0.5,
        "noise_multiplier": 1.0,
        "delta": 1e-3,
        "cohorts": [{"clients": [1, 4], "noise_multiplier": 3.0, "label": "genomic"}],
    }
    net, parts, stack = _setup(digits, fed, dp)
    # Execute
    result = run_federation(net, digits, parts, fed, seed=0, defenses=stack, capture_rounds={1})
    # Check: the cohort's updates are clipped to std / 3; the others to 0.5
    norms = {u.client_id: _norm(u) for u in result.captures[1].updates}
    assert norms[1] <= 0.5 / 3 + 1e-6 and norms[4] <= 0.5 / 3 + 1e-6
    assert norms[0] > 0.5 / 3 + 1e-3
    per_client = stack.defenses[0].privacy().per_client
    assert per_client[1] == pytest.approx(epsilon([GaussianRound(3.0, "all", count=2)], 1e-3))
    assert per_client[0] == pytest.approx(epsilon([GaussianRound(1.0, "all", count=2)], 1e-3))
    assert per_client[1] < per_client[0]


def test_local_level_noises_each_update_and_composes_participations(digits) -> None:
    # Prepare: Poisson sampling of clients, local DP
    fed = FederationSpec(
        algorithm="fedsgd", rounds=4, sample_rate=0.5, local=LocalSpec(batch_size=8, lr=0.1)
    )
    dp = {"level": "local", "clip_norm": 0.1, "noise_multiplier": 2.0, "delta": 1e-3}
    net, parts, stack = _setup(digits, fed, dp)
    # Execute
    result = run_federation(net, digits, parts, fed, seed=0, defenses=stack, capture_rounds={1})
    # Check: the update carries noise of std 0.2 per coordinate (far above the clip norm)
    update = result.captures[1].updates[0]
    flat = torch.cat([v.reshape(-1) for v in update.tensors.values()])
    assert float(flat.std()) == pytest.approx(0.2, rel=0.1)
    took_part = {c: sum(c in r.sampled for r in result.rounds) for c in range(6)}
    report = stack.defenses[0].privacy()
    for c, count in took_part.items():
        if count:
            want = epsilon([GaussianRound(2.0, "all", count=count)], 1e-3)
            assert report.per_client.get(c, report.epsilon) == pytest.approx(want)


def test_max_epsilon_stops_before_the_round_that_exceeds_it(digits) -> None:
    # Prepare: full participation, sigma 1: epsilon grows past 5 within a few rounds
    fed = FederationSpec(algorithm="fedsgd", rounds=20, local=LocalSpec(batch_size=8, lr=0.1))
    dp = {"level": "client", "noise_multiplier": 1.0, "delta": 1e-5, "max_epsilon": 5.0}
    net, parts, stack = _setup(digits, fed, dp)
    # Execute
    result = run_federation(net, digits, parts, fed, seed=0, defenses=stack)
    # Check: stopped after k rounds where k rounds fit and k + 1 do not
    k = len(result.rounds)
    assert 0 < k < 20
    assert epsilon([GaussianRound(1.0, "all", count=k)], 1e-5) <= 5.0
    assert epsilon([GaussianRound(1.0, "all", count=k + 1)], 1e-5) > 5.0
    assert result.stopped is not None and f"after round {k}" in result.stopped
    assert stack.defenses[0].privacy().epsilon <= 5.0


def test_adaptive_clipping_moves_the_clip_norm_toward_the_quantile(digits) -> None:
    # Prepare: a clip norm 100x the update norms: nearly every client is unclipped
    fed = FederationSpec(algorithm="fedsgd", rounds=8, local=LocalSpec(batch_size=8, lr=0.1))
    dp = {
        "level": "client",
        "clip_norm": 100.0,
        "noise_multiplier": 1.0,
        "clipping": "adaptive",
        "clip_learning_rate": 0.5,
        "clipped_count_stddev": 1.0,
    }
    net, parts, stack = _setup(digits, fed, dp)
    # Execute
    run_federation(net, digits, parts, fed, seed=0, defenses=stack)
    described = stack.defenses[0].describe()
    # Check: the clip norm falls every round (unclipped fraction ~1 > 0.5 target)
    norms = described["clip_norms"]
    assert len(norms) == 9 and norms[-1] < norms[0] * 0.3
    assert described["update_noise_multiplier"] > 1.0


def test_distributed_noise_leaves_each_update_a_share(digits) -> None:
    # Prepare: 4 expected clients each add a 1/sqrt(4) share
    fed = FederationSpec(
        algorithm="fedsgd", rounds=1, clients_per_round=4, local=LocalSpec(batch_size=8, lr=0.1)
    )
    dp = {"level": "client", "clip_norm": 0.01, "noise_multiplier": 1.0, "noise": "distributed"}
    net, parts, stack = _setup(digits, fed, dp)
    # Execute
    result = run_federation(net, digits, parts, fed, seed=0, defenses=stack, capture_rounds={1})
    # Check
    flat = torch.cat([v.reshape(-1) for v in result.captures[1].updates[0].tensors.values()])
    assert float(flat.std()) == pytest.approx(0.01 / 2, rel=0.1)
    assert "secure aggregation" in stack.defenses[0].describe()["notes"][0]


def test_batchnorm_on_batch_statistics_is_a_config_error(digits) -> None:
    fed = FederationSpec(algorithm="fedsgd", local=LocalSpec(batch_size=8))
    net = build_model(
        "resnet", {"depth": 8, "width": 4}, digits.info, generator=torch_generator(0, "m")
    )
    context = DefenseContext(net, fed, (10, 10), digits.info, 0)
    with pytest.raises(ConfigError, match=r"defenses.client\[0\].*batchnorm: frozen"):
        build_client_defenses([ComponentSpec(kind="dp_gaussian", params={})], context)


def test_cohort_naming_a_missing_client_is_a_config_error(digits) -> None:
    fed = FederationSpec()
    with pytest.raises(ConfigError, match="cohorts\\[0\\] names client 9"):
        _setup(digits, fed, {"cohorts": [{"clients": [9], "noise_multiplier": 2.0}]})


def test_fixed_size_client_sampling_with_add_remove_is_refused(digits) -> None:
    fed = FederationSpec(clients_per_round=3)
    with pytest.raises(ConfigError, match="replace_one"):
        _setup(digits, fed, {"neighbours": "add_remove"})


def test_adaptive_clipping_at_sample_level_is_refused() -> None:
    from gradaudit.defenses import CLIENT_DEFENSES

    with pytest.raises(ConfigError, match="level: client"):
        CLIENT_DEFENSES.parse_params(
            "dp_gaussian", {"level": "sample", "clipping": "adaptive"}, where="x"
        )


def test_an_update_from_an_empty_poisson_batch_is_not_attacked(digits) -> None:
    # Prepare: DP-SGD's Poisson batch of the target was empty; its update is pure noise
    from gradaudit.attacks.base import target_update
    from gradaudit.types import ClientUpdate, Observation

    update = ClientUpdate(0, 1, "gradient", {"w": torch.randn(3)}, num_examples=0)
    obs = Observation(1, 0, {"w": torch.zeros(3)}, (update,), None, {}, digits.info)
    # Execute
    found, reason = target_update(obs)
    # Check
    assert found is None and "no examples" in reason
