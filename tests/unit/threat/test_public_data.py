"""Public data for the adversary: granted only by `knows`, and only the held-out split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gradaudit.config import FederationSpec, ThreatSpec, build_scenario
from gradaudit.data import load_dataset
from gradaudit.errors import ConfigError
from gradaudit.federation.local import LocalPlan
from gradaudit.federation.loop import Capture
from gradaudit.threat import describe_threat, observe, observe_batch
from gradaudit.types import ClientUpdate


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", None)


def _capture() -> Capture:
    update = ClientUpdate(0, 1, "gradient", {"w": torch.ones(2)}, 2)
    return Capture(1, {"w": torch.zeros(2)}, (update,), {0: LocalPlan(0, (np.array([4, 9]),))})


def test_public_data_only_when_granted(digits) -> None:
    public = (digits.x_test, digits.y_test)
    args = (_capture(), FederationSpec(), digits.info, digits.y_train)
    bare = observe(ThreatSpec(knows=("architecture",)), *args, public_data=public)
    assert "public_data" not in bare.side_info
    granted = observe(ThreatSpec(knows=("architecture", "public_data")), *args, public_data=public)
    entry = granted.side_info["public_data"]
    assert torch.equal(entry["x"], digits.x_test) and torch.equal(entry["y"], digits.y_test)
    assert entry["x"] is not digits.x_test  # a copy: the adversary cannot touch the dataset
    assert entry["source"] == "the held-out test split of digits"


def test_granting_public_data_without_passing_it_is_an_error(digits) -> None:
    threat = ThreatSpec(knows=("public_data",))
    with pytest.raises(ValueError, match="public_data"):
        observe(threat, _capture(), FederationSpec(), digits.info, digits.y_train)
    with pytest.raises(ValueError, match="public_data"):
        observe_batch(
            nn.Sequential(nn.Flatten(), nn.Linear(64, 10)),
            digits.x_train[:1],
            digits.y_train[:1],
            digits.info,
            knows=("public_data",),
        )


def test_scenario_accepts_public_data_and_the_report_says_it() -> None:
    scenario = build_scenario(
        {
            "data": {"dataset": "digits"},
            "model": {"kind": "mlp"},
            "threat": {"knows": ["architecture", "public_data"]},
        }
    )
    assert scenario.threat.knows == ("architecture", "public_data")
    text = describe_threat(scenario.threat)
    assert "public labelled data from the same task that no client trains on" in text
    with pytest.raises(ConfigError, match=r"threat\.knows"):
        build_scenario(
            {
                "data": {"dataset": "digits"},
                "model": {"kind": "mlp"},
                "threat": {"knows": ["public"]},
            }
        )


def test_runner_grants_the_test_split_and_the_prior_attack_runs(tmp_path, monkeypatch) -> None:
    """End to end: the public data is the test split (disjoint from training); the prior is
    trained on the first audit and read from the cache on the second."""
    from gradaudit.audit import runner

    seen = {}
    real_observe = runner.observe

    def spy(*args, **kwargs):
        seen["obs"] = real_observe(*args, **kwargs)
        return seen["obs"]

    monkeypatch.setattr(runner, "observe", spy)
    monkeypatch.setenv("GRADAUDIT_CACHE_DIR", str(tmp_path / "cache"))
    prior = {"prior_epochs": 5, "prior_latent_dim": 4, "prior_width": 8}
    scenario = build_scenario(
        {
            "data": {"dataset": "digits", "num_clients": 4},
            "model": {"kind": "mlp", "params": {"hidden": [8]}},
            "federation": {"rounds": 1, "local": {"batch_size": 2}},
            "threat": {"knows": ["architecture", "public_data"]},
            "attacks": [
                {
                    "kind": "prior_inversion",
                    "params": {"iterations": 20, "generator_iterations": 10, **prior},
                }
            ],
        }
    )
    caches = []
    for out in ("a", "b"):
        report = runner.run_audit(scenario, tmp_path / out)
        entry = report["attacks"][0]
        assert entry["status"] == "ok", entry["reason"]
        assert {"psnr", "ssim"} <= entry["metrics"].keys()
        caches.append(entry["details"]["prior"]["cache"])
    assert caches == ["miss (trained now)", "hit"]
    digits = load_dataset("digits", None)
    public = seen["obs"].side_info["public_data"]
    assert torch.equal(public["x"], digits.x_test)
    train_rows = {tuple(row.tolist()) for row in digits.x_train.flatten(1)}
    assert not any(tuple(row.tolist()) in train_rows for row in public["x"].flatten(1))
