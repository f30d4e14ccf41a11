"""Secure aggregation inside the round loop and the audit: the same model as in the clear, an
adversary that sees only the aggregate, and DP-FedAvg's noise added to the secure sum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gradaudit.audit.runner import run_audit
from gradaudit.config import FederationSpec, build_scenario
from gradaudit.data import load_dataset
from gradaudit.defenses import build_client_defenses
from gradaudit.defenses.base import DefenseContext
from gradaudit.defenses.server.secagg import SecAgg, SecAggParams
from gradaudit.federation import run_federation
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.types import ClientUpdate


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _run(digits, spec, *, protocol=None, client_defenses=()):
    model = build_model("mlp", {"hidden": [16]}, digits.info, generator=torch_generator(0, "m"))
    clients = [np.arange(i, 400, 5) for i in range(5)]
    context = DefenseContext(model, spec, tuple(len(c) for c in clients), digits.info, seed=0)
    defenses = build_client_defenses(client_defenses, context)
    return run_federation(
        model,
        digits,
        clients,
        spec,
        seed=0,
        defenses=defenses,
        protocol=protocol,
        capture_rounds={1},
    )


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_secure_aggregation_trains_the_same_model_as_the_clear(digits, algorithm) -> None:
    spec = FederationSpec(
        algorithm=algorithm, rounds=3, local={"batch_size": 8, "lr": 0.1, "epochs": 1}
    )
    plain = _run(digits, spec)
    secure = _run(digits, spec, protocol=SecAgg(SecAggParams()))
    for key, value in plain.final_state.items():
        assert torch.allclose(secure.final_state[key], value, atol=1e-5), key
    assert secure.cost.stages["masked_input"]["bytes_up"] > 4 * sum(
        v.numel() for v in plain.final_state.values()
    )


def test_dp_fedavg_under_secure_aggregation_matches_the_clear(digits) -> None:
    from gradaudit.config import ComponentSpec

    spec = FederationSpec(rounds=3, local={"batch_size": 8, "lr": 0.1})
    dp = (
        ComponentSpec(
            kind="dp_gaussian",
            params={
                "level": "client",
                "clip_norm": 1.0,
                "noise_multiplier": 2.0,
                "clipping": "adaptive",
                "clipped_count_stddev": 2.0,
            },
        ),
    )
    plain = _run(digits, spec, client_defenses=dp)
    secure = _run(digits, spec, client_defenses=dp, protocol=SecAgg(SecAggParams()))
    for key, value in plain.final_state.items():
        assert torch.allclose(secure.final_state[key], value, atol=1e-5), key


def test_rounds_abort_cleanly_and_leave_the_model_unchanged(digits) -> None:
    spec = FederationSpec(rounds=2, local={"batch_size": 8}, network={"dropout": 0.95})
    result = _run(digits, spec, protocol=SecAgg(SecAggParams(threshold=0.9)))
    assert all(r.aborted for r in result.rounds)
    assert result.captures[1].aggregate is None


def test_plain_uploads_lose_updates_on_an_unreliable_network(digits) -> None:
    spec = FederationSpec(rounds=2, local={"batch_size": 8}, network={"dropout": 0.5})
    result = _run(digits, spec)
    lost = [c for r in result.rounds for c in r.lost]
    assert lost
    assert {u.client_id for u in result.captures[1].updates}.isdisjoint(result.rounds[0].lost)


BASE = {
    "name": "unit-secagg",
    "data": {"dataset": "digits", "num_clients": 4},
    "model": {"kind": "mlp", "params": {"hidden": [16]}},
    "federation": {"rounds": 2, "local": {"batch_size": 2}},
    "defenses": {"server": [{"kind": "secagg", "params": {}}]},
    "attacks": [{"kind": "label_recovery"}],
}


def test_audit_attacks_the_aggregate_not_the_individual_update(tmp_path: Path) -> None:
    report = run_audit(build_scenario(BASE), tmp_path)
    individual, aggregate = report["attacks"]
    assert individual["status"] == "not_applicable"
    assert "only the aggregate" in individual["reason"]
    assert aggregate["client"] == "aggregate" and aggregate["status"] == "ok"
    assert aggregate["clients"] == [0, 1, 2, 3]
    assert len(aggregate["details"]["true_labels"]) == 8  # the union of 4 batches of 2
    assert report["visibility"] == "aggregate_only"
    server = [d for d in report["defenses"] if d["side"] == "server"]
    assert server[0]["kind"] == "secagg" and "Bonawitz" in server[0]["guarantee"]
    cost = report["cost"]
    assert cost["protocol"] == "secagg" and set(cost["stages"]) >= {"masked_input", "unmasking"}
    assert cost["bytes_up_per_client"] == pytest.approx(
        sum(s["bytes_up"] for s in cost["stages"].values()), rel=1e-6
    )


def test_two_server_protocols_are_refused(tmp_path: Path) -> None:
    from gradaudit.errors import ConfigError

    raw = {**BASE, "defenses": {"server": [{"kind": "secagg"}, {"kind": "secagg"}]}}
    with pytest.raises(ConfigError, match="one aggregation protocol"):
        run_audit(build_scenario(raw), tmp_path)


def test_unknown_secagg_parameter_names_its_path(tmp_path: Path) -> None:
    from gradaudit.errors import ConfigError

    raw = {**BASE, "defenses": {"server": [{"kind": "secagg", "params": {"neighbors": 5}}]}}
    with pytest.raises(ConfigError, match=r"defenses\.server\[0\]\.params"):
        run_audit(build_scenario(raw), tmp_path)


def test_client_updates_never_reach_observation_under_secagg(digits) -> None:
    from gradaudit.config import ThreatSpec
    from gradaudit.threat import observe
    from gradaudit.types import Visibility

    spec = FederationSpec(rounds=1, local={"batch_size": 8})
    result = _run(digits, spec, protocol=SecAgg(SecAggParams()))
    obs = observe(
        ThreatSpec(),
        result.captures[1],
        spec,
        digits.info,
        digits.y_train,
        visibility=Visibility.AGGREGATE_ONLY,
    )
    assert obs.updates == () and obs.aggregate is not None
    assert isinstance(result.captures[1].updates[0], ClientUpdate)
