"""Gradient inversion through a generative prior trained on public data (GIAS, GGL)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call, vmap

from gradaudit.attacks.base import (
    ProgressFn,
    Reconstructs,
    checked_update,
    client_trains_batchnorm,
    gradient_estimate,
    not_applicable,
)
from gradaudit.attacks.inversion.image import GradientTarget, gradient_target
from gradaudit.attacks.inversion.priors import (
    ConvDecoder,
    PriorConfig,
    TrainedPrior,
    data_fingerprint,
    load_or_train_prior,
    one_hot,
)
from gradaudit.attacks.inversion.search import (
    BestSoFar,
    Clock,
    schedule_factor,
    set_learning_rates,
)
from gradaudit.attacks.inversion.simulate import LocalReplay, UnrollMode, local_replay
from gradaudit.attacks.labels import LabelMethod, labels_for_inversion, unknown_labels_reason
from gradaudit.seeding import torch_generator
from gradaudit.types import AttackResult, ClientUpdate, Normalization, Observation, Reconstruction

logger = logging.getLogger(__name__)


class PriorInversionParams(BaseModel):
    """Parameters of `prior_inversion`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    iterations: int = Field(400, ge=1, description="latent-search steps per restart")
    generator_iterations: int = Field(
        400,
        ge=0,
        description="steps of the second stage, which fine-tunes a copy of the generator per "
        "image together with its code (GIAS); 0 = latent search only",
    )
    max_seconds: float | None = Field(
        None,
        gt=0,
        description="wall-clock budget for both stages, split in proportion to their steps "
        "(training the prior is not counted: it is cached)",
    )
    restarts: int = Field(1, ge=1, description="latent initialisations; the best goes to stage 2")
    lr: float = Field(0.05, gt=0, description="Adam step size of the latent codes")
    generator_lr: float = Field(1e-3, gt=0, description="Adam step size of the generator copies")
    latent_weight: float = Field(
        1e-3, ge=0, description="weight of the mean squared latent code (its Gaussian prior)"
    )
    generator_weight: float = Field(
        1.0,
        ge=0,
        description="weight of the mean squared change of the generator's weights in stage 2",
    )
    schedule: Literal["step", "cosine", "constant"] = Field(
        "step",
        description="learning-rate schedule of each stage, over its steps or its share of "
        "max_seconds, whichever is further along (as in inverting_gradients)",
    )
    label_method: LabelMethod = Field("auto", description="label recovery when labels are unknown")
    center_samples: int = Field(
        8,
        ge=0,
        description="dummy batches whose mean gradient is subtracted from both gradients before "
        "the cosine, as in inverting_gradients (0 = plain cosine)",
    )
    snapshots: int = Field(
        16, ge=0, description="best-so-far reconstructions kept for the PSNR-vs-seconds curve"
    )
    max_images: int = Field(64, ge=1, description="refuse updates computed on more examples")
    unroll: UnrollMode = Field(
        "auto",
        description="FedAvg deltas: unroll the local steps (auto: when local hyperparameters are "
        "known), always, or never (treat the delta as one gradient)",
    )
    client_mode: Literal["auto", "train", "eval"] = Field(
        "auto",
        description="BatchNorm mode of the client's update: auto reads the granted local "
        "hyperparameters, else assumes train",
    )
    prior_epochs: int = Field(40, ge=1, description="training epochs of the prior")
    prior_latent_dim: int = Field(16, ge=1, description="latent size of the prior")
    prior_width: int = Field(32, ge=1, description="channel width of the prior's decoder")
    prior_batch_size: int = Field(64, ge=1, description="training batch size of the prior")
    prior_lr: float = Field(2e-3, gt=0, description="Adam step size of the prior's training")
    prior_beta: float = Field(1.0, gt=0, description="KL weight of the prior's training loss")
    public_examples: int = Field(
        2000, ge=1, description="public examples the prior trains on (a seeded random subset)"
    )
    prior_seed: int = Field(0, description="seed of the prior's training (part of its cache key)")


def public_training_set(
    public: dict[str, object], norm: Normalization, limit: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Up to `limit` granted public examples, chosen by `generator`, in pixel space [0, 1].

    Example:
        >>> norm = Normalization((0.5,), (0.5,))
        >>> public = {"x": torch.zeros(5, 1, 2, 2), "y": torch.arange(5)}
        >>> x, y = public_training_set(public, norm, 3, torch.Generator().manual_seed(0))
        >>> x.shape[0], float(x.max()), len(set(y.tolist()))
        (3, 0.5, 3)
    """
    x, y = public["x"], public["y"]
    assert isinstance(x, Tensor) and isinstance(y, Tensor)
    if x.shape[0] > limit:
        idx = torch.randperm(x.shape[0], generator=generator)[:limit].sort().values
        x, y = x[idx], y[idx]
    return norm.denormalize(x).clamp(0.0, 1.0), y.long()


def generate_per_image(
    decoder: ConvDecoder, weights: dict[str, Tensor], z: Tensor, onehot: Tensor
) -> Tensor:
    """Images from one generator copy per image: ``weights`` are stacked along dim 0."""

    def one(w: dict[str, Tensor], code: Tensor, label: Tensor) -> Tensor:
        return functional_call(decoder, w, (code[None], label[None]))[0]

    return vmap(one)(weights, z, onehot)


@dataclass(frozen=True)
class _PriorProblem:
    """What both stages need, fixed for the whole attack."""

    match: GradientTarget
    onehot: Tensor
    norm: Normalization
    decoder: ConvDecoder

    def cost(self, pixels: Tensor) -> Tensor:
        """Centred cosine distance between the update of `pixels` and the target's."""
        return self.match.distance(self.norm.normalize(pixels))


class PriorInversionAttack(Reconstructs):
    """Reconstruct the target's images inside the range of a generator trained on public data.

    The adversary trains a class-conditional VAE on public data from the task's distribution
    (granted as ``public_data``: the held-out test split, disjoint from every client's training
    data) and caches it. Stage 1 searches one latent code per image so that the generated
    batch's gradient matches the target update in direction (the centred cosine of
    `inverting_gradients`), with a Gaussian penalty on the codes; restarts keep the best.
    Stage 2 (GIAS) fine-tunes one copy of the generator per image together with its code,
    penalising the weights' departure from the trained generator, so the reconstruction can
    leave the prior's range where the prior is too coarse. The decoder is conditioned on the
    granted or recovered labels (as GGL conditions its generator on the inferred label). The
    best candidate seen is kept; its objective, negated, is the attacker's confidence.

    Jeon, Kim, Kim, Ahn & Sung, "Gradient Inversion with Generative Image Prior" (GIAS),
    NeurIPS 2021. Li, Chen, Wang, Liu & Xia, "Auditing Privacy Defenses in Federated Learning
    via Generative Gradient Leakage" (GGL), CVPR 2022.
    Threat model: an honest-but-curious server that sees the individual update and has public
    labelled data from the same task.
    """

    name: ClassVar[str] = "prior_inversion"

    def __init__(self, params: PriorInversionParams) -> None:
        self.params = params

    def _update(self, obs: Observation) -> tuple[ClientUpdate | None, str | None]:
        """Needs an individual image update, the architecture, public data and few examples."""
        update, reason = checked_update(
            obs, attack=self.name, modality="image", limit=("max_images", self.params.max_images)
        )
        if update is None:
            return None, reason
        public = obs.side_info.get("public_data")
        if not isinstance(public, dict) or not isinstance(public.get("x"), Tensor):
            return None, (
                "prior_inversion trains its generative prior on public data, and the threat "
                "model does not grant public_data"
            )
        if public["x"].shape[0] == 0:
            return None, "the granted public data is empty"
        return update, None

    def prior(self, obs: Observation) -> TrainedPrior:
        """The generative prior this attack uses on `obs`: cached, else trained on its public data.

        Raises:
            ValueError: `obs` grants no public image data.
        """
        p = self.params
        public = obs.side_info.get("public_data")
        norm = obs.task.normalization
        if not isinstance(public, dict) or norm is None:
            raise ValueError("the prior needs public image data")
        picker = torch_generator(p.prior_seed, "prior/public", obs.task.dataset)
        x, y = public_training_set(public, norm, p.public_examples, picker)
        channels, height, width = obs.task.input_shape
        config = PriorConfig(
            dataset=obs.task.dataset,
            fingerprint=data_fingerprint(x, y),
            input_shape=(channels, height, width),
            num_classes=obs.task.num_classes,
            latent_dim=p.prior_latent_dim,
            width=p.prior_width,
            epochs=p.prior_epochs,
            batch_size=p.prior_batch_size,
            lr=p.prior_lr,
            beta=p.prior_beta,
            seed=p.prior_seed,
            examples=int(x.shape[0]),
        )
        return load_or_train_prior(config, x, y)

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Invert the target's update into images through the prior."""
        update, reason = self._update(obs)
        if update is not None:
            reason = unknown_labels_reason(obs, update, model)
        if update is None or reason is not None:
            return not_applicable(self.name, obs, str(reason))
        p = self.params
        prior = self.prior(obs)
        started = time.perf_counter()
        count = update.num_examples
        train_mode = client_trains_batchnorm(obs, p.client_mode)
        labels, label_source = labels_for_inversion(
            obs, model, count=count, method=p.label_method, rng=rng, train_mode=train_mode
        )
        grads, grad_source = gradient_estimate(update, obs)
        try:
            replay = local_replay(update, obs, p.unroll)
        except ValueError as error:
            return not_applicable(self.name, obs, str(error))
        problem = self._problem(obs, model, grads, labels, train_mode, prior.decoder, replay, rng)
        latent_steps = p.iterations * p.restarts
        run = BestSoFar(
            started=started,
            total=latent_steps + p.generator_iterations,
            to_pixels=lambda pixels: pixels.clamp(0.0, 1.0),
            snapshots=p.snapshots,
            max_seconds=p.max_seconds,
            progress=progress,
        )
        latent_deadline = generator_deadline = None
        if p.max_seconds is not None:  # the time left after setup, split like the steps
            now = time.perf_counter()
            generator_deadline = started + p.max_seconds
            share = latent_steps / (latent_steps + p.generator_iterations)
            latent_deadline = now + max(0.0, generator_deadline - now) * share
        best_z, best_cost = None, float("inf")
        for restart in range(p.restarts):
            z0 = torch.randn((count, p.prior_latent_dim), generator=rng)
            clock = Clock.start(p.iterations, latent_deadline, p.restarts - restart)
            z, cost = self._latent_search(problem, z0, clock, run)
            logger.info("prior_inversion restart %d: objective %.6f", restart, cost)
            if cost < best_cost:
                best_z, best_cost = z, cost
            if latent_deadline is not None and time.perf_counter() >= latent_deadline:
                break
        assert best_z is not None
        latent_cost = best_cost
        generator_steps = 0
        if p.generator_iterations > 0:
            clock = Clock.start(p.generator_iterations, generator_deadline)
            generator_steps = self._generator_search(problem, best_z, clock, run)
        best_pixels, best_cost = run.best()
        images = best_pixels.clamp(0.0, 1.0)
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
            seconds=time.perf_counter() - started + prior.seconds,
            details={
                "labels": label_source,
                "gradient": grad_source,
                "replay": replay.description,
                "iterations_run": run.done,
                "generator_iterations_run": generator_steps,
                "objective": best_cost,
                "latent_objective": latent_cost,
                "centred": problem.match.center is not None,
                "prior": {
                    "kind": "class-conditional VAE",
                    "key": prior.key[:16],
                    "cache": "hit" if prior.from_cache else "miss (trained now)",
                    "seconds": round(prior.seconds, 3),
                    "public_examples": prior.config.examples,
                    "public_source": obs.side_info["public_data"]["source"],  # type: ignore[index]
                    "final_loss": prior.final_loss,
                },
                "recipe": p.model_dump(),
            },
            trace=tuple(run.trace),
            snapshots=run.final_snapshots(),
        )

    def _problem(
        self,
        obs: Observation,
        model: nn.Module,
        grads: dict[str, Tensor],
        labels: Tensor,
        train_mode: bool,
        decoder: ConvDecoder,
        replay: LocalReplay,
        rng: torch.Generator,
    ) -> _PriorProblem:
        assert obs.task.normalization is not None
        match = gradient_target(
            obs,
            model,
            grads,
            labels,
            replay,
            train_mode=train_mode,
            center_samples=self.params.center_samples,
            rng=rng,
        )
        return _PriorProblem(
            match=match,
            onehot=one_hot(labels, obs.task.num_classes),
            norm=obs.task.normalization,
            decoder=decoder,
        )

    def _latent_search(
        self, problem: _PriorProblem, z0: Tensor, clock: Clock, run: BestSoFar
    ) -> tuple[Tensor, float]:
        """Stage 1, one restart: the best code seen and its objective."""
        p = self.params
        z = z0.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=p.lr)
        best_z, best_cost = z.detach().clone(), float("inf")
        for step in range(p.iterations):
            set_learning_rates(optimiser, [p.lr], schedule_factor(p.schedule, clock.fraction(step)))
            pixels = problem.decoder(z, problem.onehot)
            objective = problem.cost(pixels)
            objective = objective + p.latent_weight * z.pow(2).mean()
            (z.grad,) = torch.autograd.grad(objective, [z])
            cost = float(objective.detach())
            if cost < best_cost:
                best_cost, best_z = cost, z.detach().clone()
            optimiser.step()
            out_of_time = clock.out_of_time()
            run.offer(pixels, cost, final=out_of_time)
            if out_of_time:
                break
        return best_z, best_cost

    def _generator_search(
        self, problem: _PriorProblem, z0: Tensor, clock: Clock, run: BestSoFar
    ) -> int:
        """Stage 2 (GIAS): fine-tune a generator copy per image with its code.

        Its candidates go to `run`, which keeps the best over both stages.

        Returns:
            The steps run.
        """
        p = self.params
        count = int(z0.shape[0])
        original = {n: w.detach() for n, w in problem.decoder.named_parameters()}
        numel = sum(w.numel() for w in original.values())
        weights = {
            n: w.unsqueeze(0).repeat(count, *([1] * w.dim())).requires_grad_(True)
            for n, w in original.items()
        }
        z = z0.clone().requires_grad_(True)
        optimiser = torch.optim.Adam(
            [{"params": [z], "lr": p.lr}, {"params": list(weights.values())}],
            lr=p.generator_lr,
        )
        step = 0
        for step in range(1, p.generator_iterations + 1):
            factor = schedule_factor(p.schedule, clock.fraction(step - 1))
            set_learning_rates(optimiser, [p.lr, p.generator_lr], factor)
            pixels = generate_per_image(problem.decoder, weights, z, problem.onehot)
            drift = sum((weights[n] - original[n]).pow(2).sum() for n in original) / (numel * count)
            objective = problem.cost(pixels)
            objective = objective + p.latent_weight * z.pow(2).mean() + p.generator_weight * drift
            variables = [z, *weights.values()]
            for variable, grad in zip(
                variables, torch.autograd.grad(objective, variables), strict=True
            ):
                variable.grad = grad
            cost = float(objective.detach())
            optimiser.step()
            out_of_time = clock.out_of_time()
            run.offer(pixels, cost, final=out_of_time)
            if out_of_time:
                break
        return step
