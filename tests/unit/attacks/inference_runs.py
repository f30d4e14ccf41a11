"""Shared by the inference-attack tests: run a small federation and build the view the runner
hands an attack that reads every round."""

from __future__ import annotations

import dataclasses

import torch

from gradaudit.config import Scenario
from gradaudit.data.base import Dataset
from gradaudit.federation import FederationResult, run_federation
from gradaudit.models import build_model
from gradaudit.seeding import torch_generator
from gradaudit.threat import observe
from gradaudit.threat.challenge import Challenge
from gradaudit.types import Observation


def federate(sc: Scenario, data: Dataset, parts: list) -> tuple[torch.nn.Module, FederationResult]:
    """The scenario's model and its federation on `parts`, every round captured."""
    model = build_model(
        sc.model.kind, sc.model.params, data.info, generator=torch_generator(sc.seed, "model")
    )
    rounds = set(range(1, sc.federation.rounds + 1))
    return model, run_federation(
        model, data, parts, sc.federation, seed=sc.seed, capture_rounds=rounds
    )


def attack_view(
    sc: Scenario, data: Dataset, fed: FederationResult, challenge: Challenge
) -> Observation:
    """What the runner hands a history attack: every captured round, candidates in each (the
    test split is the public data, handed over only where the threat model grants it)."""
    public = (data.x_test, data.y_test)
    views = tuple(
        observe(
            sc.threat, fed.captures[r], sc.federation, data.info, data.y_train, public_data=public
        )
        for r in sorted(fed.captures)
    )
    views = tuple(
        dataclasses.replace(v, side_info={**v.side_info, "candidates": challenge.public})
        for v in views
    )
    target = next(v for v in views if v.round == sc.threat.target.round)
    return dataclasses.replace(target, history=views, final_params=fed.final_state)
