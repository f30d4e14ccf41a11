"""Passive membership inference from one client's update (Nasr et al. 2019, passive white-box).

Nasr, Shokri and Houmansadr, "Comprehensive Privacy Analysis of Deep Learning: Passive and Active
White-box Inference Attacks against Centralized and Federated Learning", IEEE S&P 2019: an
honest-but-curious server holds the global model and each client's update, so it can evaluate a
candidate record under the client's local model and compare the record's own gradient with the
update. Both signals need no shadow model.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from gradaudit.attacks.base import (
    Infers,
    ProgressFn,
    Question,
    gradient_estimate,
    target_update,
)
from gradaudit.attacks.signals import (
    candidates,
    flat,
    gradient_signals,
    local_lr,
    local_state,
    record_losses,
    unanswerable,
)
from gradaudit.types import ClientUpdate, Observation


def membership_inputs(obs: Observation) -> tuple[ClientUpdate | None, str | None]:
    """The target's update when a one-update membership attack can run, else the reason."""
    reason = unanswerable(obs)
    return (None, reason) if reason is not None else target_update(obs)


class MembershipLossParams(BaseModel):
    """Parameters of ``membership_loss``.

    Attributes:
        calibrate: score the drop in loss from the global model to the client's local model
            (per-record difficulty calibration, Watson et al., "On the Importance of Difficulty
            Calibration in Membership Inference Attacks", ICLR 2022) rather than the local loss
            alone (Yeom et al., CSF 2018).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    calibrate: bool = True


class MembershipLossAttack(Infers):
    """A record is a member when the client's local model fits it better than the global one.

    The server rebuilds the client's local model (global + its FedAvg delta, or one SGD step of
    the granted learning rate along its FedSGD gradient) and scores each candidate by minus its
    loss there, calibrated by its loss under the global model the client started from.
    """

    name: ClassVar[str] = "membership_loss"
    question: ClassVar[Question | None] = "membership"

    def __init__(self, params: MembershipLossParams | None = None) -> None:
        self.params = params or MembershipLossParams()

    def applicable(self, obs: Observation) -> str | None:
        """None when the candidates, the architecture and the target's update are at hand."""
        update, reason = membership_inputs(obs)
        if update is None:
            return reason
        if update.kind == "gradient" and local_lr(obs) is None:
            return (
                "forming the client's local model from its FedSGD gradient needs the local "
                "learning rate (grant local_hyperparameters)"
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
        """Score every candidate by its (calibrated) loss under the client's local model."""
        update, _ = target_update(obs)
        x, y = candidates(obs)  # type: ignore[misc]
        state = local_state(model, obs.global_params, update, local_lr(obs))  # type: ignore[arg-type]
        scores = -record_losses(model, state, x, y)  # type: ignore[arg-type]
        if self.params.calibrate:
            scores = scores + record_losses(model, obs.global_params, x, y)
        return scores, {
            "statistic": "loss(global) - loss(local)" if self.params.calibrate else "-loss",
            "local_model": "global + delta"
            if update.kind == "delta"  # type: ignore[union-attr]
            else "global - lr * gradient",
        }


class MembershipGradientParams(BaseModel):
    """Parameters of ``membership_gradient``.

    Attributes:
        statistic: ``cosine``: the cosine between the record's gradient at the global model and
            the client's update read as a gradient (members pulled the update their way);
            ``norm``: minus the norm of the record's gradient at the client's local model
            (members are fitted, so their gradients are small).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    statistic: Literal["cosine", "norm"] = "cosine"


class MembershipGradientAttack(Infers):
    """A record is a member when its own gradient points where the client's update went.

    Nasr et al. 2019 feed each record's gradient to their attack model; its two strongest
    summaries, the gradient's norm and its alignment with the observed update, are used here
    directly as scores.
    """

    name: ClassVar[str] = "membership_gradient"
    question: ClassVar[Question | None] = "membership"

    def __init__(self, params: MembershipGradientParams | None = None) -> None:
        self.params = params or MembershipGradientParams()

    def applicable(self, obs: Observation) -> str | None:
        """None when the candidates, the architecture and the target's update are at hand."""
        update, reason = membership_inputs(obs)
        if update is None:
            return reason
        if self.params.statistic == "norm" and update.kind == "gradient" and local_lr(obs) is None:
            return (
                "the gradient norm at the client's local model needs the local learning rate to "
                "form that model from a FedSGD gradient (grant local_hyperparameters)"
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
        """Score every candidate by its gradient's cosine with the update, or its norm."""
        update, _ = target_update(obs)
        x, y = candidates(obs)  # type: ignore[misc]
        grads, how = gradient_estimate(update, obs)  # type: ignore[arg-type]
        params = {name for name, _ in model.named_parameters()}
        keys = [k for k in grads if k in params]
        if self.params.statistic == "cosine":
            _, cos = gradient_signals(model, obs.global_params, x, y, keys, flat(grads, keys))
            scores, statistic = cos, "cosine(record gradient at the global model, update)"
        else:
            state = local_state(model, obs.global_params, update, local_lr(obs))  # type: ignore[arg-type]
            norms, _ = gradient_signals(model, state, x, y, keys)  # type: ignore[arg-type]
            scores, statistic = -norms, "-|record gradient at the local model|"
        return scores, {"statistic": statistic, "update_read_as": how, "parameters": len(keys)}
