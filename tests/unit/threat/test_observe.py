"""What the adversary is given: only the granted side information."""

from __future__ import annotations

import numpy as np
import torch

from gradaudit.config import FederationSpec, ThreatSpec
from gradaudit.data import load_dataset
from gradaudit.federation.local import LocalPlan
from gradaudit.federation.loop import Capture
from gradaudit.threat import describe_threat, observe
from gradaudit.types import ClientUpdate


def _capture() -> Capture:
    update = ClientUpdate(1, 2, "gradient", {"w": torch.ones(2)}, 2)
    other = ClientUpdate(0, 2, "gradient", {"w": torch.zeros(2)}, 2)
    plans = {1: LocalPlan(1, (np.array([4, 9]),)), 0: LocalPlan(0, (np.array([1, 2]),))}
    return Capture(2, {"w": torch.zeros(2)}, (other, update), plans)


def test_side_information_only_when_granted() -> None:
    digits = load_dataset("digits", None)
    spec = FederationSpec(rounds=2)
    bare = observe(
        ThreatSpec(knows=(), target={"round": 2, "client": 1}),
        _capture(),
        spec,
        digits.info,
        digits.y_train,
    )
    assert dict(bare.side_info) == {}
    full = observe(
        ThreatSpec(
            knows=("labels", "batch_size", "architecture", "local_hyperparameters"),
            target={"round": 2, "client": 1},
        ),
        _capture(),
        spec,
        digits.info,
        digits.y_train,
    )
    assert full.side_info["labels"].tolist() == digits.y_train[[4, 9]].tolist()
    assert full.side_info["local_hyperparameters"]["num_steps"] == 1
    assert full.update_of(1).client_id == 1
    torch.testing.assert_close(full.aggregate["w"], torch.full((2,), 0.5))


def test_threat_sentence_lists_knowledge() -> None:
    text = describe_threat(ThreatSpec(knows=("labels", "architecture")))
    assert text.startswith("An honest-but-curious server")
    assert "knowing the labels of the target's examples and the model architecture" in text
    assert "knowing nothing beyond" in describe_threat(ThreatSpec(knows=()))
