"""Gradient inversion of images: Inverting Gradients (Geiping et al. 2020)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.attacks.base import (
    ProgressFn,
    attacker_model,
    checked_update,
    client_trains_batchnorm,
    gradient_estimate,
    not_applicable,
)
from gradaudit.attacks.labels import LabelMethod, dummy_inputs, recover_labels
from gradaudit.models import classifier_head, classifier_keys
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction, TaskInfo

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


def head_input_from_gradient(weight_grad: Tensor, bias_grad: Tensor) -> Tensor:
    """The input of a linear layer, recovered exactly from its gradient for a single example.

    For one example, ``dL/dW = (dL/db) h^T``, so every row with a non-zero bias gradient is a
    multiple of the input ``h``; the least-squares combination over all rows is
    ``h = sum_c g_b[c] g_W[c] / sum_c g_b[c]^2`` (Phong et al. 2017; Geiping et al. 2020, §3).

    Example:
        >>> h = torch.tensor([1.0, 2.0, 3.0]); gb = torch.tensor([0.5, -0.5])
        >>> head_input_from_gradient(gb[:, None] * h[None, :], gb).tolist()
        [1.0, 2.0, 3.0]
    """
    return (bias_grad[:, None] * weight_grad).sum(dim=0) / bias_grad.pow(2).sum().clamp_min(1e-30)


def mean_dummy_gradient(
    model: nn.Module, labels: Tensor, task: TaskInfo, rng: torch.Generator, *, samples: int
) -> list[Tensor]:
    """The parameter gradient averaged over `samples` batches of dummy inputs with `labels`.

    It estimates the part of the client's gradient that does not depend on its inputs (at
    initialisation most of the deep layers' gradient is that part).
    """
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    total = [torch.zeros_like(p) for p in params]
    for _ in range(samples):
        x = dummy_inputs(task, int(labels.shape[0]), rng)
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), labels), params)
        total = [t + g.detach() / samples for t, g in zip(total, grads, strict=True)]
    model.load_state_dict(state)
    return total


class InvertingGradientsParams(BaseModel):
    """Parameters of `inverting_gradients`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    iterations: int = Field(1000, ge=1, description="optimisation steps per restart")
    max_seconds: float | None = Field(None, gt=0, description="wall-clock budget for all restarts")
    restarts: int = Field(1, ge=1, description="independent initialisations; the best is kept")
    lr: float = Field(0.1, gt=0, description="Adam step size")
    tv_weight: float = Field(0.01, ge=0, description="weight of the total-variation prior")
    signed: bool = Field(True, description="step on the sign of the image gradient")
    boxed: bool = Field(True, description="keep pixels inside [0, 1]")
    lr_decay: bool = Field(True, description="divide lr by 10 at 3/8, 5/8 and 7/8 of the run")
    init: Literal["randn", "rand", "zeros"] = Field(
        "randn", description="initial guess: normal noise, uniform pixels, or the mean image"
    )
    label_method: LabelMethod = Field("auto", description="label recovery when labels are unknown")
    center_samples: int = Field(
        8,
        ge=0,
        description="dummy batches whose mean gradient is subtracted from both gradients before "
        "the cosine (0 = plain Inverting Gradients)",
    )
    feature_weight: float = Field(
        0.0,
        ge=0,
        description="weight of matching the classifier's input features, recovered analytically "
        "from the head's gradient (batch 1 only)",
    )
    max_images: int = Field(64, ge=1, description="refuse updates computed on more examples")
    client_mode: Literal["auto", "train", "eval"] = Field(
        "auto",
        description="BatchNorm mode of the client's update: auto reads the granted local "
        "hyperparameters, else assumes train",
    )


@dataclass(frozen=True)
class _MatchingProblem:
    """Everything one optimisation run needs, fixed for the whole attack."""

    model: nn.Module
    labels: Tensor
    shape: tuple[int, ...]
    lo: Tensor
    hi: Tensor
    target: list[Tensor]
    target_sq: Tensor
    center: list[Tensor] | None
    head: nn.Linear
    feature_target: Tensor | None


class InvertingGradientsAttack:
    """Reconstruct the target's images by matching the direction of its gradient.

    Minimises ``1 - cos(grad(x), g)`` plus a total-variation prior over candidate images ``x``
    with signed Adam, a box constraint and step decay, over several restarts; the candidate with
    the lowest objective is kept, and its objective is the attacker's confidence. Labels come
    from the threat model if granted, else from `label_recovery`.

    Geiping, Bauermeister, Dröge & Moeller, "Inverting Gradients - How easy is it to break
    privacy in federated learning?", NeurIPS 2020.
    Threat model: an honest-but-curious server that sees the individual update.

    Note:
        Two refinements of ours, both on by parameter and measured in docs/BENCHMARKS.md.
        *Centring* (``center_samples``): at initialisation the deep layers' gradient barely
        depends on the input yet carries most of the norm, so the plain cosine mostly compares
        uninformative coordinates. Subtracting the mean gradient of dummy inputs with the same
        labels from both sides keeps the optimum (the true input still matches exactly) and lets
        the informative early layers steer. *Feature matching* (``feature_weight``, batch 1):
        the classifier's input is recovered exactly from its gradient and matched too.
    """

    name: ClassVar[str] = "inverting_gradients"

    def __init__(self, params: InvertingGradientsParams) -> None:
        self.params = params

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        return checked_update(obs, attack=self.name, images=True, max_images=self.params.max_images)

    def applicable(self, obs: Observation) -> str | None:
        """Needs an individual image-model update, the architecture, and few enough examples."""
        return self._update(obs)[1]

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Invert the target's update into images."""
        update, reason = self._update(obs)
        if update is None:
            return not_applicable(self.name, obs, str(reason))
        started = time.perf_counter()
        p = self.params
        assert obs.task.normalization is not None
        count = update.num_examples
        train_mode = client_trains_batchnorm(obs, p.client_mode)
        granted = obs.side_info.get("labels")
        if isinstance(granted, Tensor):
            labels, label_source = granted.clone(), "granted by the threat model"
        else:
            labels, method = recover_labels(
                obs, model, count=count, method=p.label_method, rng=rng, train_mode=train_mode
            )
            label_source = f"recovered ({method})"
        grads, grad_source = gradient_estimate(update, obs)
        problem = self._problem(obs, model, grads, labels, train_mode, rng)
        deadline = started + p.max_seconds if p.max_seconds else None
        total = p.iterations * p.restarts
        best_x, best_cost = None, float("inf")
        trace: list[tuple[int, float, float]] = []
        done = 0
        for restart in range(p.restarts):
            x, cost, steps = self._optimise(
                problem, rng, deadline, started, trace, done, progress, total
            )
            done += steps
            logger.info("inverting_gradients restart %d: objective %.6f", restart, cost)
            if cost < best_cost:
                best_x, best_cost = x, cost
            if deadline is not None and time.perf_counter() >= deadline:
                break
        assert best_x is not None
        images = obs.task.normalization.denormalize(best_x).clamp(0.0, 1.0)
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
                "centred": problem.center is not None,
                "feature_target": problem.feature_target is not None,
                "recipe": p.model_dump(),
            },
            trace=tuple(trace),
        )

    def _problem(
        self,
        obs: Observation,
        model: nn.Module,
        grads: dict[str, Tensor],
        labels: Tensor,
        train_mode: bool,
        rng: torch.Generator,
    ) -> _MatchingProblem:
        p = self.params
        assert obs.task.normalization is not None
        attacker = attacker_model(model, obs)
        attacker.train(train_mode)
        names = [n for n, _ in attacker.named_parameters()]
        target = [grads[n].detach() for n in names]
        center = None
        if p.center_samples > 0:
            center = mean_dummy_gradient(attacker, labels, obs.task, rng, samples=p.center_samples)
            target = [t - c for t, c in zip(target, center, strict=True)]
        _, head = classifier_head(attacker)
        weight_key, bias_key = classifier_keys(attacker)
        feature_target = None
        if labels.shape[0] == 1 and p.feature_weight > 0 and bias_key is not None:
            feature_target = head_input_from_gradient(grads[weight_key], grads[bias_key])
        norm = obs.task.normalization
        return _MatchingProblem(
            model=attacker,
            labels=labels,
            shape=(int(labels.shape[0]), *obs.task.input_shape),
            lo=norm.normalize(torch.zeros(1, *obs.task.input_shape)),
            hi=norm.normalize(torch.ones(1, *obs.task.input_shape)),
            target=target,
            target_sq=torch.stack([t.pow(2).sum() for t in target]).sum(),
            center=center,
            head=head,
            feature_target=feature_target,
        )

    def _optimise(
        self,
        problem: _MatchingProblem,
        rng: torch.Generator,
        deadline: float | None,
        started: float,
        trace: list[tuple[int, float, float]],
        offset: int,
        progress: ProgressFn | None,
        total: int,
    ) -> tuple[Tensor, float, int]:
        """One restart: returns the best candidate seen, its objective, and the steps run."""
        p, lo, hi = self.params, problem.lo, problem.hi
        if p.init == "randn":
            x = torch.randn(problem.shape, generator=rng)
        elif p.init == "zeros":
            x = torch.zeros(problem.shape) + 1e-3 * torch.randn(problem.shape, generator=rng)
        else:
            x = lo + (hi - lo) * torch.rand(problem.shape, generator=rng)
        if p.boxed:
            x = torch.max(torch.min(x, hi), lo)
        x.requires_grad_(True)
        optimiser = torch.optim.Adam([x], lr=p.lr)
        milestones = [int(p.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if p.lr_decay else []
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones, gamma=0.1)
        params = list(problem.model.parameters())
        features: list[Tensor] = []
        hook = None
        if problem.feature_target is not None:
            feature_sq = problem.feature_target.pow(2).sum().clamp_min(1e-30)
            hook = problem.head.register_forward_hook(
                lambda _m, inputs, _o: features.append(inputs[0])
            )
        best_x, best_cost = x.detach().clone(), float("inf")
        every = max(1, p.iterations // 200)
        step = 0
        try:
            for step in range(1, p.iterations + 1):
                features.clear()
                loss = nn.functional.cross_entropy(problem.model(x), problem.labels)
                grads = list(torch.autograd.grad(loss, params, create_graph=True))
                if problem.center is not None:
                    grads = [g - c for g, c in zip(grads, problem.center, strict=True)]
                objective = cosine_distance(grads, problem.target, problem.target_sq)
                if p.tv_weight:
                    objective = objective + p.tv_weight * total_variation(x)
                if problem.feature_target is not None:
                    mismatch = (features[0].reshape(-1) - problem.feature_target).pow(2).sum()
                    objective = objective + p.feature_weight * mismatch / feature_sq
                (x.grad,) = torch.autograd.grad(objective, [x])
                cost = float(objective.detach())
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
        finally:
            if hook is not None:
                hook.remove()
        return best_x, best_cost, step
