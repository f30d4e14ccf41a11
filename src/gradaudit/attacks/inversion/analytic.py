"""Exact recovery of a linear layer's input from its gradient (Phong et al. 2017)."""

from __future__ import annotations

import time
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from gradaudit.attacks.base import (
    ProgressFn,
    Reconstructs,
    attacker_model,
    checked_update,
    gradient_estimate,
    not_applicable,
    withheld_head_reason,
)
from gradaudit.attacks.inversion.image import head_input_from_gradient
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction


class AnalyticParams(BaseModel):
    """`analytic` takes no parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def first_linear(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The model's first parameterised layer when it is an nn.Linear with a bias, else None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return (name, module) if module.bias is not None else None
        if any(True for _ in module.parameters(recurse=False)):
            return None
    return None


def _withheld_layer_reason(update: ClientUpdate, model: nn.Module, layer: str) -> str | None:
    """Why the first layer's gradient is unavailable (the client withheld it), else None."""
    if not {f"{layer}.weight", f"{layer}.bias"} & update.withheld:
        return None
    return withheld_head_reason(update, model) or (
        f"the client withheld the gradient of the first layer ({layer})"
    )


class AnalyticAttack(Reconstructs):
    """Recover the input of a model whose first layer is fully connected, exactly, at batch 1.

    For one example, ``dL/dW1 = (dL/db1) x^T``: every row of the first layer's weight gradient
    is a multiple of the (flattened) input, and the bias gradient gives the multiple. No
    optimisation, no prior: the reconstruction is exact up to floating-point error.

    Phong, Aono, Hayashi, Wang & Moriai, "Privacy-Preserving Deep Learning via Additively
    Homomorphic Encryption", IEEE TIFS 2017; Geiping et al. 2020, Proposition 1.
    Threat model: an honest-but-curious server that sees the individual FedSGD gradient.
    """

    name: ClassVar[str] = "analytic"

    def __init__(self, params: AnalyticParams) -> None:
        self.params = params

    def _update(
        self, obs: Observation, model: nn.Module | None = None
    ) -> tuple[ClientUpdate | None, str | None]:
        update, reason = checked_update(obs, attack=self.name, modality="image")
        if update is None:
            return None, reason
        if update.kind != "gradient":
            return None, "exact recovery needs a single gradient (FedSGD), not a FedAvg change"
        if update.num_examples != 1:
            return None, (
                f"exact recovery of the first layer's input needs one example; the update "
                f"was computed on {update.num_examples}"
            )
        if model is not None:
            found = first_linear(model)
            if found is None:
                return None, "the model does not start with a fully connected layer with a bias"
            reason = _withheld_layer_reason(update, model, found[0])
            if reason is not None:
                return None, reason
        return update, None

    def applicable(self, obs: Observation, model: nn.Module | None = None) -> str | None:
        """Needs batch 1, a FedSGD gradient, and a model that starts with a linear layer."""
        return self._update(obs, model)[1]

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Divide the first layer's weight gradient by its bias gradient."""
        update, reason = self._update(obs, model)
        if update is None:
            return not_applicable(self.name, obs, str(reason))
        started = time.perf_counter()
        grads, _ = gradient_estimate(update, obs)
        found = first_linear(attacker_model(model, obs))
        assert found is not None
        layer, _ = found
        x = head_input_from_gradient(grads[f"{layer}.weight"], grads[f"{layer}.bias"])
        x = x.reshape(1, *obs.task.input_shape)
        assert obs.task.normalization is not None
        images = obs.task.normalization.denormalize(x).clamp(0.0, 1.0)
        if progress is not None:
            progress(1, 1)
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(images=images),
            seconds=time.perf_counter() - started,
            details={"layer": layer},
        )
