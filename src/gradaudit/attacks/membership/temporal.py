"""Membership inference over every round the server saw (FedMIA, Zhu et al. 2024).

Zhu, Liu, Li, Lyu and Wang, "FedMIA: An Effective Membership Inference Attack Exploiting 'All for
One' Principle in Federated Learning" (arXiv 2402.06289, CVPR 2025): in each round the other
clients' updates are models that did *not* train on the target's records, so they give the
server, for free, the distribution a non-member's signal follows. The target's signal is tested
against it in every round and the evidence is combined over rounds.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.attacks.base import Infers, ProgressFn, Question
from gradaudit.attacks.signals import (
    candidates,
    local_lr,
    loss_drop,
    record_losses,
    rounds_of,
    unanswerable,
)
from gradaudit.types import Observation


class MembershipTemporalParams(BaseModel):
    """Parameters of ``membership_temporal``.

    Attributes:
        reference: ``others``: test the target's signal against the other clients' signals in
            the same round (FedMIA's one-tailed test) in every round with at least `min_others`
            of them; ``none``: add the target's signals over rounds; ``auto``: ``others`` when
            some round has enough other clients, else ``none``.
        variance: ``per_record``: each record's spread over the other clients; ``fixed``: the
            spread pooled over records, one per round (steadier with few clients).
        min_others: the fewest other clients a round needs for the ``others`` test.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    reference: Literal["auto", "others", "none"] = "auto"
    variance: Literal["per_record", "fixed"] = "fixed"
    min_others: int = Field(2, ge=2)


def loss_drops(model: nn.Module, obs: Observation, x: Tensor, y: Tensor) -> dict[int, Tensor]:
    """Per client seen in `obs`: each record's loss under the global model minus under the
    client's local model (float64); clients whose local model cannot be formed are left out."""
    base = record_losses(model, obs.global_params, x, y)
    lr = local_lr(obs)
    out: dict[int, Tensor] = {}
    for update in obs.updates:
        if update.num_examples == 0:
            continue
        drop = loss_drop(model, obs.global_params, update, x, y, lr, base=base)
        if drop is not None:
            out[update.client_id] = drop
    return out


def one_tailed_evidence(target: Tensor, others: Tensor, *, per_record: bool) -> Tensor:
    """log P(an out-client's signal ≤ the target's), per record, under a Gaussian fitted to the
    other clients' signals `others` (K, N); near 0 for a member, negative for a non-member."""
    mean = others.mean(dim=0)
    spread = others.var(dim=0)
    std = (spread if per_record else spread.mean().expand_as(mean)).sqrt()
    z = (target - mean) / std.clamp_min(1e-12)
    return torch.special.log_ndtr(z)


class MembershipTemporalAttack(Infers):
    """Combine a record's membership evidence over every round and client the server saw.

    Per round the signal is the record's drop in loss from the global model to each client's
    local model. With ``others`` as reference the target's drop is scored by how far it lies
    above the other clients' drops (one-tailed Gaussian test), and the log-probabilities add
    over rounds; with ``none`` the drops themselves add.
    """

    name: ClassVar[str] = "membership_temporal"
    question: ClassVar[Question | None] = "membership"
    needs_history: ClassVar[bool] = True

    def __init__(self, params: MembershipTemporalParams | None = None) -> None:
        self.params = params or MembershipTemporalParams()

    def applicable(self, obs: Observation) -> str | None:
        """None when the candidates, the architecture and a round with the target's update are
        at hand (and, for ``others``, a round with enough other clients)."""
        reason = unanswerable(obs)
        if reason is not None:
            return reason
        rounds = rounds_of(obs)
        seen = [r for r in rounds if r.update_of(obs.target_client) is not None]
        if not seen:
            if any(r.aggregate is not None and not r.updates for r in rounds):
                return "the server sees only the aggregate of the clients' updates"
            return f"client {obs.target_client} sent no update in any round the server saw"
        if all(r.update_of(obs.target_client).kind == "gradient" for r in seen) and (
            local_lr(obs) is None
        ):
            return (
                "forming local models from FedSGD gradients needs the local learning rate "
                "(grant local_hyperparameters)"
            )
        if self.params.reference == "others" and not any(
            len(r.updates) - 1 >= self.params.min_others for r in seen
        ):
            return (
                f"no round has {self.params.min_others} other clients' updates to compare the "
                "target's with (reference: others)"
            )
        return None

    def infer(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None,
    ) -> tuple[Tensor, dict[str, object]]:
        """Sum each record's per-round evidence over the rounds in which the target took part."""
        x, y = candidates(obs)  # type: ignore[misc]
        rounds = rounds_of(obs)
        seen = [r for r in rounds if r.update_of(obs.target_client) is not None]
        mode = self.params.reference
        if mode == "auto":
            enough = any(len(r.updates) - 1 >= self.params.min_others for r in seen)
            mode = "others" if enough else "none"
        score = torch.zeros(len(y), dtype=torch.float64)
        used = []
        for done, view in enumerate(seen, start=1):
            drops = loss_drops(model, view, x, y)
            mine = drops.pop(obs.target_client, None)
            if mine is not None and mode == "none":
                score += mine
                used.append(view.round)
            elif mine is not None and len(drops) >= self.params.min_others:
                others = torch.stack(list(drops.values()))
                per_record = self.params.variance == "per_record"
                score += one_tailed_evidence(mine, others, per_record=per_record)
                used.append(view.round)
            if progress is not None:
                progress(done, len(seen))
        return score, {
            "signal": "loss(global) - loss(client's local model), per round",
            "reference": mode,
            "rounds": used,
            "variance": self.params.variance,
        }
