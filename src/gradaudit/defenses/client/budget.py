"""``update_budget``: gradient budgeting, a norm cap per update and a cap on rounds per client.

Two limits, either or both:

- ``max_norm``: each update's L2 norm over its sent floating-point tensors is scaled down to at
  most ``max_norm`` (the clipping step of DP-FedAvg, McMahan et al. 2018, without its noise);
- ``max_rounds``: a client takes part in at most ``max_rounds`` rounds; when sampled after that
  it declines (the round loop records it in ``RoundRecord.declined``).

Neither is differential privacy. Clipping without noise bounds how large an update is, not what
it reveals; the round cap bounds how many updates an adversary collects from one client, not
what each of them reveals. Guarantee: none (heuristic).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradaudit.defenses import CLIENT_DEFENSES
from gradaudit.defenses.base import (
    HEURISTIC,
    ClientDefense,
    DefenseContext,
    LocalData,
    float_keys,
    with_tensors,
)
from gradaudit.defenses.dp import clip_update
from gradaudit.types import ClientUpdate


class UpdateBudgetParams(BaseModel):
    """Parameters of ``update_budget`` (at least one of the two)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_norm: float | None = Field(
        None, gt=0, description="cap on each update's L2 norm (clipping, no noise)"
    )
    max_rounds: int | None = Field(
        None, ge=1, description="rounds a client may take part in; later it declines"
    )

    @model_validator(mode="after")
    def _one_limit(self) -> UpdateBudgetParams:
        if self.max_norm is None and self.max_rounds is None:
            raise ValueError("set max_norm, max_rounds or both")
        return self


class UpdateBudget(ClientDefense):
    """Gradient budgeting: clip each update's norm and/or cap each client's rounds.

    ``max_norm`` scales the sent floating-point tensors of an update jointly so that their L2
    norm is at most ``max_norm`` (the clipping of DP-FedAvg, McMahan, Ramage, Talwar & Zhang,
    "Learning Differentially Private Recurrent Language Models", ICLR 2018, with no noise).
    ``max_rounds`` limits participation: :meth:`admits` counts a round each time it lets a
    client in (a client admitted and then dropped still spends that round), and refuses once
    the client has taken part ``max_rounds`` times. Asking twice about the same client and
    round counts once. The counts live in this object: build a new one for each run.

    Guarantee: none (heuristic).
    """

    name = "update_budget"
    guarantee = HEURISTIC

    def __init__(self, params: UpdateBudgetParams, planned_rounds: int | None = None) -> None:
        self.params = params
        self.planned_rounds = planned_rounds
        self.rounds_taken: dict[int, set[int]] = {}
        self.declined = 0

    def admits(self, client: int, rnd: int) -> bool:
        """Whether `client` may take part in round `rnd`; a True answer spends one round."""
        cap = self.params.max_rounds
        if cap is None:
            return True
        taken = self.rounds_taken.setdefault(client, set())
        if rnd in taken:
            return True
        if len(taken) >= cap:
            self.declined += 1
            return False
        taken.add(rnd)
        return True

    def transform(
        self, update: ClientUpdate, *, rng: torch.Generator, local: LocalData
    ) -> ClientUpdate:
        """The update scaled to L2 norm at most ``max_norm`` (unchanged without a cap)."""
        keys = float_keys(update)
        if self.params.max_norm is None or not keys:
            return update
        tensors, _ = clip_update(update.tensors, keys, self.params.max_norm)
        return with_tensors(update, tensors)

    def describe(self) -> dict[str, Any]:
        """Settings, what each limit bounds, and what it does not."""
        p = self.params
        notes: list[str] = []
        warnings = [
            "no formal guarantee: neither limit adds noise; this is not differential "
            "privacy (use dp_gaussian for that)"
        ]
        if p.max_norm is not None:
            notes.append(
                f"each update is scaled to L2 norm at most {p.max_norm:g} over its sent "
                "floating-point tensors"
            )
            warnings.append(
                "clipping keeps the update's direction: attacks that match gradients by cosine "
                "similarity (Geiping et al. 2020) are unaffected by the scale"
            )
        if p.max_rounds is not None:
            notes.append(
                f"each client takes part in at most {p.max_rounds} round(s); "
                f"{self.declined} request(s) declined so far"
            )
            warnings.append(
                "the round cap limits how many updates of a client an adversary sees, not what "
                "any one of them reveals"
            )
            if self.planned_rounds is not None and p.max_rounds >= self.planned_rounds:
                warnings.append(
                    f"max_rounds {p.max_rounds} is not below the run's {self.planned_rounds} "
                    "rounds: the cap never binds"
                )
        return self.entry(notes, warnings)


@CLIENT_DEFENSES.register(
    "update_budget",
    summary="gradient budgeting: clip each update to `max_norm` (no noise) and/or let a client "
    "take part in at most `max_rounds` rounds; guarantee none (heuristic)",
    params=UpdateBudgetParams,
)
def _build_update_budget(params: UpdateBudgetParams, context: DefenseContext) -> UpdateBudget:
    return UpdateBudget(params, planned_rounds=context.federation.rounds)
