"""Gradient inversion of images: Inverting Gradients (Geiping et al. 2020)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.attacks.base import (
    ProgressFn,
    attacker_model,
    gradient_estimate,
    not_applicable,
    target_update,
)
from gradaudit.attacks.labels import LabelMethod, recover_labels
from gradaudit.types import AttackResult, Observation, Reconstruction

logger = logging.getLogger(__name__)


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic total variation: mean absolute difference of neighbouring pixels, per axis.

    Example:
        >>> float(total_variation(torch.zeros(1, 1, 4, 4)))
        0.0
    """
    dx = (x[:, :, :, :-1] - x[:, :, :, 1:]).abs().mean()
    dy = (x[:, :, :-1, :] - x[:, :, 1:, :]).abs().mean()
    return dx + dy


def cosine_distance(grads: Sequence[Tensor], target: Sequence[Tensor], target_sq: Tensor) -> Tensor:
    """``1 - cos`` between two gradients taken as one vector over all parameter tensors."""
    dot = torch.stack([(g * t).sum() for g, t in zip(grads, target, strict=True)]).sum()
    norm_sq = torch.stack([g.pow(2).sum() for g in grads]).sum()
    return 1.0 - dot / (norm_sq.sqrt() * target_sq.sqrt() + 1e-12)


class InvertingGradientsParams(BaseModel):
    """Parameters of `inverting_gradients`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    iterations: int = Field(1000, ge=1, description="optimisation steps per restart")
    max_seconds: float | None = Field(None, gt=0, description="wall-clock budget for all restarts")
    restarts: int = Field(1, ge=1, description="independent initialisations; the best is kept")
    lr: float = Field(0.1, gt=0, description="Adam step size")
    tv_weight: float = Field(0.05, ge=0, description="weight of the total-variation prior")
    signed: bool = Field(True, description="step on the sign of the image gradient")
    boxed: bool = Field(True, description="keep pixels inside [0, 1]")
    lr_decay: bool = Field(True, description="divide lr by 10 at 3/8, 5/8 and 7/8 of the run")
    init: Literal["randn", "rand"] = Field("randn", description="initial guess distribution")
    label_method: LabelMethod = Field("auto", description="label recovery when labels are unknown")
    max_images: int = Field(64, ge=1, description="refuse updates computed on more examples")
    client_mode: Literal["train", "eval"] = Field(
        "train", description="the mode the client computed its update in (BatchNorm statistics)"
    )


class InvertingGradientsAttack:
    """Reconstruct the target's images by matching the direction of its gradient.

    Minimises ``1 - cos(grad(x), g)`` plus a total-variation prior over candidate images ``x``
    with signed Adam, a box constraint and step decay, over several restarts; the candidate with
    the lowest objective is kept, and its objective is the attacker's confidence. Labels come
    from the threat model if granted, else from `label_recovery`.

    Geiping, Bauermeister, Dröge & Moeller, "Inverting Gradients - How easy is it to break
    privacy in federated learning?", NeurIPS 2020.
    Threat model: an honest-but-curious server that sees the individual update.
    """

    name: ClassVar[str] = "inverting_gradients"

    def __init__(self, params: InvertingGradientsParams) -> None:
        self.params = params

    def applicable(self, obs: Observation) -> str | None:
        """Needs an individual image-model update, the architecture, and few enough examples."""
        update, reason = target_update(obs)
        if update is None:
            return reason
        if obs.task.modality != "image" or obs.task.normalization is None:
            return f"inverting_gradients reconstructs images; {obs.task.dataset} is {obs.task.modality}"
        if not obs.side_info.get("architecture"):
            return "the adversary does not know the model architecture"
        if update.num_examples > self.params.max_images:
            return (
                f"the update was computed on {update.num_examples} examples, more than "
                f"max_images={self.params.max_images}"
            )
        return None

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Invert the target's update into images."""
        reason = self.applicable(obs)
        if reason is not None:
            return not_applicable(self.name, obs, reason)
        started = time.perf_counter()
        update, _ = target_update(obs)
        assert update is not None and obs.task.normalization is not None
        count = update.num_examples
        granted = obs.side_info.get("labels")
        if isinstance(granted, Tensor):
            labels, label_source = granted.clone(), "granted by the threat model"
        else:
            labels, method = recover_labels(
                obs, model, count=count, method=self.params.label_method, rng=rng
            )
            label_source = f"recovered ({method})"
        grads, grad_source = gradient_estimate(update, obs)
        attacker = attacker_model(model, obs)
        attacker.train(self.params.client_mode == "train")
        names = [n for n, _ in attacker.named_parameters()]
        target = [grads[n].detach() for n in names]
        norm = obs.task.normalization
        shape = (count, *obs.task.input_shape)
        lo = norm.normalize(torch.zeros(1, *obs.task.input_shape))
        hi = norm.normalize(torch.ones(1, *obs.task.input_shape))
        deadline = started + self.params.max_seconds if self.params.max_seconds else None

        total = self.params.iterations * self.params.restarts
        best_x, best_cost = None, float("inf")
        trace: list[tuple[int, float, float]] = []
        done = 0
        for restart in range(self.params.restarts):
            x, cost, steps = self._optimise(
                attacker, target, labels, shape, lo, hi, rng, deadline, started, trace, done,
                progress, total,
            )
            done += steps
            logger.info("inverting_gradients restart %d: objective %.5f", restart, cost)
            if cost < best_cost:
                best_x, best_cost = x, cost
            if deadline is not None and time.perf_counter() >= deadline:
                break
        assert best_x is not None
        images = norm.denormalize(best_x).clamp(0.0, 1.0)
        return AttackResult(
            self.name,
            obs.round,
            obs.target_client,
            "ok",
            reconstruction=Reconstruction(
                images=images,
                labels=labels,
                confidence=torch.full((count,), -best_cost, dtype=torch.float64),
            ),
            seconds=time.perf_counter() - started,
            details={
                "labels": label_source,
                "gradient": grad_source,
                "iterations_run": done,
                "objective": best_cost,
                "recipe": self.params.model_dump(),
            },
            trace=tuple(trace),
        )

    def _optimise(
        self,
        model: nn.Module,
        target: list[Tensor],
        labels: Tensor,
        shape: tuple[int, ...],
        lo: Tensor,
        hi: Tensor,
        rng: torch.Generator,
        deadline: float | None,
        started: float,
        trace: list[tuple[int, float, float]],
        offset: int,
        progress: ProgressFn | None,
        total: int,
    ) -> tuple[Tensor, float, int]:
        p = self.params
        if p.init == "randn":
            x = torch.randn(shape, generator=rng)
        else:
            x = lo + (hi - lo) * torch.rand(shape, generator=rng)
        if p.boxed:
            x = torch.max(torch.min(x, hi), lo)
        x.requires_grad_(True)
        optimiser = torch.optim.Adam([x], lr=p.lr)
        milestones = [int(p.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimiser, milestones=milestones if p.lr_decay else [], gamma=0.1
        )
        params = list(model.parameters())
        target_sq = torch.stack([t.pow(2).sum() for t in target]).sum()
        best_x, best_cost = x.detach().clone(), float("inf")
        every = max(1, p.iterations // 200)
        step = 0
        for step in range(1, p.iterations + 1):
            optimiser.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), labels)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            match = cosine_distance(grads, target, target_sq)
            objective = match + p.tv_weight * total_variation(x) if p.tv_weight else match
            (x.grad,) = torch.autograd.grad(objective, [x])
            cost = float(match.detach())
            if cost < best_cost:
                best_cost, best_x = cost, x.detach().clone()
            if p.signed:
                x.grad.sign_()
            optimiser.step()
            scheduler.step()
            if p.boxed:
                with torch.no_grad():
                    x.data = torch.max(torch.min(x, hi), lo)
            out_of_time = deadline is not None and time.perf_counter() >= deadline
            if step == 1 or step % every == 0 or step == p.iterations or out_of_time:
                trace.append((offset + step, time.perf_counter() - started, cost))
            if progress is not None:
                progress(offset + step, total)
            if out_of_time:
                break
        return best_x, best_cost, step
