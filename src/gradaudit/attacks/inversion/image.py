"""Gradient inversion of images: Inverting Gradients (Geiping et al. 2020)."""

from __future__ import annotations

import contextlib
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
    Reconstructs,
    attacker_model,
    checked_update,
    client_trains_batchnorm,
    gradient_estimate,
    not_applicable,
    sent_positions,
)
from gradaudit.attacks.inversion.search import (
    BestSoFar,
    Clock,
    schedule_factor,
    set_learning_rates,
)
from gradaudit.attacks.inversion.simulate import (
    LocalReplay,
    UnrollMode,
    batchnorm_layers,
    bn_statistics_distance,
    bn_statistics_target,
    labelled_loss,
    local_replay,
    mean_candidate_update,
    recording_batchnorm,
    simulated_update,
)
from gradaudit.attacks.labels import (
    LabelMethod,
    dummy_inputs,
    labels_for_inversion,
    unknown_labels_reason,
)
from gradaudit.models import classifier_head, classifier_keys
from gradaudit.types import AttackResult, ClientUpdate, Observation, Reconstruction

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


@dataclass(frozen=True)
class GradientTarget:
    """The update a gradient-matching attack matches, and how it replays candidates.

    Attributes:
        model: the attacker's copy of the global model, in the client's BatchNorm mode.
        labels: the candidates' labels.
        replay: how the client's local computation is replayed (one gradient or unrolled).
        target: the observed update (gradient-like, see `gradient_estimate`), centred if
            `center` is set, in ``model.named_parameters()`` order, sent parameters only.
        target_sq: its squared norm.
        center: the mean simulated update of dummy inputs with the same labels, or None.
        keep: positions in ``model.named_parameters()`` of the parameters the client sent
            (`sent_positions`), or None for all of them.
    """

    model: nn.Module
    labels: Tensor
    replay: LocalReplay
    target: list[Tensor]
    target_sq: Tensor
    center: list[Tensor] | None
    keep: tuple[int, ...] | None = None

    def distance(self, x: Tensor) -> Tensor:
        """The (centred) cosine distance between candidate `x`'s simulated update and the
        target's over the sent parameters (differentiable in `x`)."""
        grads = simulated_update(self.model, x, labelled_loss(self.labels), self.replay)
        if self.keep is not None:
            grads = [grads[i] for i in self.keep]
        if self.center is not None:
            grads = [g - c for g, c in zip(grads, self.center, strict=True)]
        return cosine_distance(grads, self.target, self.target_sq)


def gradient_target(
    obs: Observation,
    model: nn.Module,
    grads: dict[str, Tensor],
    labels: Tensor,
    replay: LocalReplay,
    *,
    train_mode: bool,
    center_samples: int,
    rng: torch.Generator,
) -> GradientTarget:
    """Set up the matching: the attacker's model copy, the target and its centring.

    Centring (``center_samples`` > 0) subtracts the mean simulated update of that many dummy
    batches with the same labels from both sides (see `InvertingGradientsAttack`). Only the
    parameters present in `grads` (those the client sent) are compared.
    """
    attacker = attacker_model(model, obs)
    attacker.train(train_mode)
    names = [n for n, _ in attacker.named_parameters()]
    keep = sent_positions(attacker, grads)
    target = [grads[names[i]].detach() for i in keep]
    center = None
    if center_samples > 0:
        center = mean_candidate_update(
            attacker,
            labelled_loss(labels),
            replay,
            lambda: dummy_inputs(obs.task, int(labels.shape[0]), rng),
            samples=center_samples,
        )
        center = [center[i] for i in keep]
        target = [t - c for t, c in zip(target, center, strict=True)]
    return GradientTarget(
        model=attacker,
        labels=labels,
        replay=replay,
        target=target,
        target_sq=torch.stack([t.pow(2).sum() for t in target]).sum(),
        center=center,
        keep=keep if len(keep) < len(names) else None,
    )


BN_WEIGHT = 1.0
"""Default weight of the BatchNorm-statistics term (measured in docs/BENCHMARKS.md)."""


class InvertingGradientsParams(BaseModel):
    """Parameters of `inverting_gradients`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    iterations: int = Field(1000, ge=1, description="optimisation steps per restart")
    max_seconds: float | None = Field(None, gt=0, description="wall-clock budget for all restarts")
    restarts: int = Field(1, ge=1, description="independent initialisations; the best is kept")
    lr: float = Field(0.1, gt=0, description="Adam step size")
    tv_weight: float = Field(0.001, ge=0, description="weight of the total-variation prior")
    signed: bool = Field(True, description="step on the sign of the image gradient")
    boxed: bool = Field(True, description="keep pixels inside [0, 1]")
    schedule: Literal["step", "cosine", "constant"] = Field(
        "cosine",
        description="learning-rate schedule: step (divide by 10 at 3/8, 5/8, 7/8 of the run, as "
        "in the paper), cosine annealing to 0, or constant",
    )
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
    bn_weight: float = Field(
        BN_WEIGHT,
        ge=0,
        description="weight of matching the BatchNorm statistics revealed by the running-stat "
        "change the client sent (DeepInversion prior; used only when the update carries one)",
    )
    unroll: UnrollMode = Field(
        "auto",
        description="FedAvg deltas: unroll the local steps (auto: when local hyperparameters are "
        "known), always, or never (treat the delta as one gradient)",
    )
    snapshots: int = Field(
        16, ge=0, description="best-so-far reconstructions kept for the PSNR-vs-seconds curve"
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

    match: GradientTarget
    shape: tuple[int, ...]
    lo: Tensor
    hi: Tensor
    head: nn.Linear
    feature_target: Tensor | None
    bn_target: dict[str, tuple[Tensor, Tensor]] | None
    bn_running: dict[str, tuple[Tensor, Tensor]]

    def objective(self, x: Tensor, params: InvertingGradientsParams) -> Tensor:
        """The attack's objective at candidate `x` (differentiable in `x`)."""
        with contextlib.ExitStack() as stack:
            recorder = (
                stack.enter_context(recording_batchnorm(self.match.model))
                if self.bn_target is not None
                else None
            )
            features: list[Tensor] = []
            if self.feature_target is not None:
                handle = self.head.register_forward_hook(
                    lambda _m, inputs, _o: features.append(inputs[0])
                )
                stack.callback(handle.remove)
            objective = self.match.distance(x)
        if params.tv_weight:
            objective = objective + params.tv_weight * total_variation(x)
        if self.feature_target is not None:
            mismatch = (features[0].reshape(-1) - self.feature_target).pow(2).sum()
            scale = self.feature_target.pow(2).sum().clamp_min(1e-30)
            objective = objective + params.feature_weight * mismatch / scale
        if recorder is not None and self.bn_target is not None:
            distance = bn_statistics_distance(
                recorder, recorder.layers, self.bn_running, self.bn_target
            )
            objective = objective + params.bn_weight * distance
        return objective


class InvertingGradientsAttack(Reconstructs):
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
        """Needs an individual image-model update, the architecture, and few enough examples."""
        return checked_update(
            obs, attack=self.name, modality="image", limit=("max_images", self.params.max_images)
        )

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
        norm = obs.task.normalization
        assert norm is not None
        count = update.num_examples
        train_mode = client_trains_batchnorm(obs, p.client_mode)
        reason = unknown_labels_reason(obs, update, model)
        if reason is not None:
            return not_applicable(self.name, obs, reason)
        labels, label_source = labels_for_inversion(
            obs, model, count=count, method=p.label_method, rng=rng, train_mode=train_mode
        )
        grads, grad_source = gradient_estimate(update, obs)
        try:
            replay = local_replay(update, obs, p.unroll)
        except ValueError as error:
            return not_applicable(self.name, obs, str(error))
        problem = self._problem(obs, model, grads, labels, train_mode, replay, update, rng)
        deadline = started + p.max_seconds if p.max_seconds else None
        search = BestSoFar(
            started=started,
            total=p.iterations * p.restarts,
            to_pixels=lambda z: norm.denormalize(z).clamp(0.0, 1.0),
            snapshots=p.snapshots,
            max_seconds=p.max_seconds,
            progress=progress,
        )
        for restart in range(p.restarts):
            cost = self._optimise(problem, rng, deadline, search, p.restarts - restart)
            logger.info("inverting_gradients restart %d: objective %.6f", restart, cost)
            if deadline is not None and time.perf_counter() >= deadline:
                break
        best_x, best_cost = search.best()
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
                "replay": replay.description,
                "iterations_run": search.done,
                "objective": best_cost,
                "centred": problem.match.center is not None,
                "feature_target": problem.feature_target is not None,
                "batchnorm_statistics": problem.bn_target is not None,
                "recipe": p.model_dump(),
            },
            trace=tuple(search.trace),
            snapshots=search.final_snapshots(),
        )

    def _problem(
        self,
        obs: Observation,
        model: nn.Module,
        grads: dict[str, Tensor],
        labels: Tensor,
        train_mode: bool,
        replay: LocalReplay,
        update: ClientUpdate,
        rng: torch.Generator,
    ) -> _MatchingProblem:
        p = self.params
        norm = obs.task.normalization
        assert norm is not None
        match = gradient_target(
            obs,
            model,
            grads,
            labels,
            replay,
            train_mode=train_mode,
            center_samples=p.center_samples,
            rng=rng,
        )
        count = int(labels.shape[0])
        _, head = classifier_head(match.model)
        weight_key, bias_key = classifier_keys(match.model)
        feature_target = None
        head_sent = weight_key in grads and bias_key is not None and bias_key in grads
        if count == 1 and p.feature_weight > 0 and head_sent and not replay.unrolled:
            assert bias_key is not None
            feature_target = head_input_from_gradient(grads[weight_key], grads[bias_key])
        layers = batchnorm_layers(match.model)
        bn_target = bn_statistics_target(update, layers) if train_mode and p.bn_weight > 0 else None
        return _MatchingProblem(
            match=match,
            shape=(count, *obs.task.input_shape),
            lo=norm.normalize(torch.zeros(1, *obs.task.input_shape)),
            hi=norm.normalize(torch.ones(1, *obs.task.input_shape)),
            head=head,
            feature_target=feature_target,
            bn_target=bn_target,
            bn_running={
                name: (module.running_mean.clone(), module.running_var.clone())  # type: ignore[union-attr]
                for name, module in layers
            },
        )

    def _optimise(
        self,
        problem: _MatchingProblem,
        rng: torch.Generator,
        deadline: float | None,
        search: BestSoFar,
        restarts_left: int,
    ) -> float:
        """One restart; returns the lowest objective it reached.

        With a deadline, the restart plans for an equal share of the time left.
        """
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
        clock = Clock.start(p.iterations, deadline, restarts_left)
        lowest = float("inf")
        for step in range(p.iterations):
            set_learning_rates(optimiser, [p.lr], schedule_factor(p.schedule, clock.fraction(step)))
            objective = problem.objective(x, p)
            (x.grad,) = torch.autograd.grad(objective, [x])
            cost = float(objective.detach())
            lowest = min(lowest, cost)
            out_of_time = clock.out_of_time()
            search.offer(x, cost, final=out_of_time)
            if p.signed:
                x.grad.sign_()
            optimiser.step()
            if p.boxed:
                with torch.no_grad():
                    x.data = torch.max(torch.min(x, hi), lo)
            if out_of_time:
                break
        return lowest
