"""The Likelihood Ratio Attack (LiRA) on a client's local model or the federation's final model.

Carlini, Chien, Nasr, Song, Terzis and Tramèr, "Membership Inference Attacks From First
Principles", IEEE S&P 2022. The attacker trains shadow models, some with a record (IN) and some
without (OUT), and fits a Gaussian to the record's scaled-logit confidence under each kind; the
target model's confidence is then scored by how much likelier it is under the IN Gaussian than
under the OUT one (online), or by how far it sits above the OUT Gaussian (offline, one-sided).
Records differ a lot in how hard they are to fit; the per-record Gaussians calibrate for it,
which is what makes the attack strong at low false-positive rates.

The estimates follow the authors' reference code (TensorFlow Privacy, ``mi_lira_2021`` and
``advanced_mia.compute_score_lira``): per-record means are medians over the shadows, variances
are per record or one pooled ("fixed") variance of the deviations from those medians.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.func import functional_call

from gradaudit.attacks.base import Infers, ProgressFn, Question, not_applicable, target_update
from gradaudit.attacks.membership.shadows import (
    ShadowOptimizer,
    balanced_keep,
    shadow_logits,
    train_shadows,
)
from gradaudit.attacks.signals import candidates, local_state, unanswerable
from gradaudit.federation.local import has_batchnorm
from gradaudit.types import AttackResult, Observation, TensorDict

MIN_STD = 1e-12
"""Floor of a fitted standard deviation (shadows that all agree exactly)."""

CHUNK = 512
"""Records per forward pass when computing confidences."""

BATCHNORM = "LiRA's vectorised shadow models cannot train BatchNorm"
"""Why the attack does not run on a model with BatchNorm."""


def logit_confidence(logits: Tensor, y: Tensor) -> Tensor:
    """Carlini et al.'s scaled logit ``log p_y - log(1 - p_y)`` of the true class, in float64.

    Computed as ``z_y - logsumexp_{j != y} z_j``, which is the same quantity without ever
    forming ``p_y`` (``1 - p_y`` rounds to 0 for a well-fitted record in float32 and float64).

    Args:
        logits: (..., N, C) logits, e.g. (N, C) or (S, N, C) for S shadow models.
        y: (N,) true labels.

    Returns:
        (..., N) float64 confidences.

    Example:
        >>> logit_confidence(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))
        tensor([1.3069], dtype=torch.float64)
    """
    z = logits.double()
    if z.shape[-1] < 2:
        raise ValueError("the scaled logit needs at least two classes")
    labels = y.long().expand(z.shape[:-1]).unsqueeze(-1)
    true = z.gather(-1, labels).squeeze(-1)
    others = z.scatter(-1, labels, float("-inf"))
    return true - torch.logsumexp(others, dim=-1)


@dataclass(frozen=True)
class GaussianFit:
    """Per-record Gaussians fitted to shadow confidences.

    Attributes:
        mean: (N,) the median confidence of each record's shadows; a record without any
            shadow of the kind gets the mean of the other records' medians.
        std: (N,) per-record standard deviations, or the pooled one repeated (fixed variance).
        missing: how many records had no shadow of the kind.
    """

    mean: Tensor
    std: Tensor
    missing: int


def fit_gaussians(conf: Tensor, mask: Tensor, *, fixed_variance: bool) -> GaussianFit:
    """Fit each record's Gaussian from the shadows selected by `mask`.

    The mean is the median over the selected shadows (as in the authors' code). With
    `fixed_variance` one standard deviation serves every record: that of all deviations of
    selected confidences from their record's median, pooled over records. Otherwise each record
    has its own (population) standard deviation; a record with fewer than two selected shadows
    gets the mean of the others' (the pooled one when no record has two). A record with no
    selected shadow gets the mean of the other records' medians (TensorFlow Privacy does the
    same); `missing` counts them.

    Args:
        conf: (S, N) shadow confidences.
        mask: (S, N) bool, which shadows count for which record.
        fixed_variance: one pooled variance instead of one per record.

    Raises:
        ValueError: fewer than two selected confidences in all: no Gaussian can be fitted.
    """
    conf = conf.double()
    mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    if int(mask.sum()) < 2:
        raise ValueError("fewer than two shadow confidences to fit a Gaussian to")
    values = conf.masked_fill(~mask, float("nan"))
    counts = mask.sum(dim=0)
    median = torch.nanquantile(values, 0.5, dim=0)
    missing = int((counts == 0).sum())
    median = torch.where(counts > 0, median, median.nanmean())
    deviations = (values - median)[mask]
    pooled = deviations.std(correction=0)
    if fixed_variance:
        std = pooled.expand(conf.shape[1]).clone()
    else:
        centred = values - values.nanmean(dim=0)
        std = centred.pow(2).nanmean(dim=0).sqrt()
        std = torch.where(counts >= 2, std, float("nan"))
        fill = std.nanmean() if bool((counts >= 2).any()) else pooled
        std = torch.where(counts >= 2, std, fill)
    return GaussianFit(median, std.clamp_min(MIN_STD), missing)


def _log_normal(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x; mean, std^2)`` without its constant ``-log(2 pi) / 2``."""
    return -0.5 * ((x - mean) / std) ** 2 - std.log()


def lira_online(
    target_conf: Tensor, shadow_conf: Tensor, keep: Tensor | np.ndarray, *, fixed_variance: bool
) -> Tensor:
    """The online LiRA score: ``log N(c; mu_in, s_in^2) - log N(c; mu_out, s_out^2)``.

    The log of the likelihood ratio Λ of Carlini et al.'s Algorithm 1 for each record's target
    confidence ``c``, with Gaussians from :func:`fit_gaussians` on its IN and OUT shadows.
    Higher means more likely a member. Records without an IN (OUT) shadow use the mean of the
    other records' IN (OUT) medians.

    Args:
        target_conf: (N,) the target model's confidences (:func:`logit_confidence`).
        shadow_conf: (S, N) the shadows' confidences on the same records.
        keep: (S, N) bool, True where the shadow trained on the record (IN).
        fixed_variance: one pooled variance per side instead of one per record.

    Returns:
        (N,) float64 scores.
    """
    keep = torch.as_tensor(np.asarray(keep, dtype=bool))
    c = target_conf.double()
    fit_in = fit_gaussians(shadow_conf, keep, fixed_variance=fixed_variance)
    fit_out = fit_gaussians(shadow_conf, ~keep, fixed_variance=fixed_variance)
    return _log_normal(c, fit_in.mean, fit_in.std) - _log_normal(c, fit_out.mean, fit_out.std)


def lira_offline(
    target_conf: Tensor, shadow_conf: Tensor, keep: Tensor | np.ndarray, *, fixed_variance: bool
) -> Tensor:
    """The offline LiRA score: ``log Φ((c - mu_out) / s_out)``, one-sided against OUT.

    Carlini et al.'s offline test ``Λ = 1 - Pr[Z > c]``, ``Z ~ N(mu_out, s_out^2)``: only OUT
    shadows are needed, so they can be trained before the records to test are known. Returned
    as log Λ (``torch.special.log_ndtr``), which orders records like Λ and does not round to 0
    for records far below their OUT distribution. Higher means more likely a member.

    Args:
        target_conf: (N,) the target model's confidences.
        shadow_conf: (S, N) the shadows' confidences.
        keep: (S, N) bool, True where the shadow trained on the record; only the OUT
            shadows (False) are used.
        fixed_variance: one pooled variance instead of one per record.

    Returns:
        (N,) float64 scores.
    """
    out = ~torch.as_tensor(np.asarray(keep, dtype=bool))
    fit = fit_gaussians(shadow_conf, out, fixed_variance=fixed_variance)
    return torch.special.log_ndtr((target_conf.double() - fit.mean) / fit.std)


class LiraParams(BaseModel):
    """Parameters of ``lira``.

    Attributes:
        shadows: shadow models trained (all at once, vectorised).
        mode: ``online`` (IN and OUT shadows, each candidate IN for half of them) or
            ``offline`` (OUT shadows only: trained on granted public data, else on random halves
            of the candidates with only their OUT statistics used).
        variance: ``fixed`` (one pooled variance, better with few shadows) or ``per_example``.
        target_model: ``local`` (the target client's model after the observed round: global +
            its update) or ``final`` (the federation's final model).
        optimizer: the shadows' optimiser; the clients train with plain SGD.
        lr: the shadows' learning rate (None: the granted local learning rate).
        batch_size: their batch size (None: the granted local batch size).
        epochs: their epochs (None: the granted local epochs; for ``final``: rounds x local
            epochs).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    shadows: int = Field(16, ge=2, description="shadow models, trained together")
    mode: Literal["online", "offline"] = "online"
    variance: Literal["per_example", "fixed"] = "fixed"
    target_model: Literal["final", "local"] = "local"
    optimizer: ShadowOptimizer = "sgd"
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)


@dataclass(frozen=True)
class Schedule:
    """How the shadows train: optimiser, learning rate, batch size, and epochs or steps."""

    optimizer: ShadowOptimizer
    lr: float
    batch_size: int
    epochs: int | None
    steps: int | None

    def describe(self) -> dict[str, object]:
        """The schedule for the report."""
        length = {"epochs": self.epochs} if self.epochs is not None else {"steps": self.steps}
        return {"optimizer": self.optimizer, "lr": self.lr, "batch_size": self.batch_size, **length}


def _hyper(obs: Observation) -> Mapping[str, object]:
    granted = obs.side_info.get("local_hyperparameters")
    return granted if isinstance(granted, Mapping) else {}


def _local_length(hyper: Mapping[str, object], algorithm: str) -> tuple[int | None, int | None]:
    """(epochs, steps) of one client's local training in one round."""
    if algorithm == "fedsgd":
        return None, 1
    if hyper.get("steps"):
        return None, int(hyper["steps"])  # type: ignore[call-overload]
    return int(hyper.get("epochs") or 1), None  # type: ignore[call-overload]


def shadow_schedule(params: LiraParams, obs: Observation) -> tuple[Schedule | None, str | None]:
    """The shadows' training schedule from the overrides and the granted hyperparameters.

    ``local``: the client's local training (FedSGD: one step; FedAvg: its epochs or steps).
    ``final``: central training for rounds x the local epochs (or steps; FedSGD: one step per
    round); the rounds come from ``side_info["rounds"]``. The `epochs` override replaces
    either length.

    Returns:
        ``(schedule, None)``, or ``(None, reason)`` when something needed is not known.
    """
    hyper = _hyper(obs)
    lr = params.lr if params.lr is not None else hyper.get("lr")
    batch = params.batch_size if params.batch_size is not None else hyper.get("batch_size")
    grant = "grant local_hyperparameters or set the lira parameter"
    if lr is None:
        return None, f"the shadows need the clients' learning rate ({grant} lr)"
    if batch is None:
        return None, f"the shadows need the clients' batch size ({grant} batch_size)"
    opt, lr, batch = params.optimizer, float(lr), int(batch)  # type: ignore[call-overload]
    if params.epochs is not None:
        return Schedule(opt, lr, batch, params.epochs, None), None
    if not hyper:
        return None, f"the shadows need the clients' local epochs ({grant} epochs)"
    update = obs.update_of(obs.target_client)
    kind = update.kind if update is not None else None
    algorithm = str(hyper.get("algorithm") or ("fedsgd" if kind == "gradient" else "fedavg"))
    epochs, steps = _local_length(hyper, algorithm)
    if params.target_model == "local":
        return Schedule(opt, lr, batch, epochs, steps), None
    rounds = obs.side_info.get("rounds")
    if not isinstance(rounds, int) or rounds < 1:
        return None, (
            "training shadows like the federation needs the number of rounds "
            "(side_info['rounds']) or the lira parameter epochs"
        )
    if steps is not None:
        return Schedule(opt, lr, batch, None, rounds * steps), None
    return Schedule(opt, lr, batch, rounds * (epochs or 1), None), None


@dataclass(frozen=True)
class TargetModel:
    """The model under attack, where the shadows start, and how both were obtained."""

    state: TensorDict
    init: TensorDict
    how: str


def attacked_model(
    obs: Observation, params: LiraParams, lr: float
) -> tuple[TargetModel | None, str]:
    """The attacked model, or None and the reason the adversary cannot form it.

    ``local``: the target's model after the round, ``global + delta`` (FedAvg) or
    ``global - lr * gradient`` (FedSGD; the aggregate when the adversary sees only that);
    shadows start from the round's global model. ``final``: the final model; shadows start
    from the federation's initial model.
    """
    if params.target_model == "final":
        if obs.final_params is None or obs.initial_params is None:
            return None, "the final and initial models are not part of this observation"
        return TargetModel(obs.final_params, obs.initial_params, "the final model"), ""
    update, reason = target_update(obs)
    if update is None:
        return None, str(reason)
    state = local_state(None, obs.global_params, update, lr)  # LiRA refuses BatchNorm models
    if state is None:
        return None, "the target's local model cannot be formed"
    how = (
        "global + the target's FedAvg delta"
        if update.kind == "delta"
        else "global - lr x the target's FedSGD gradient"
    )
    return TargetModel(state, obs.global_params, how), ""


@dataclass(frozen=True)
class ShadowData:
    """The shadows' training pool (candidates first) and which records each trains on."""

    x: Tensor
    y: Tensor
    keep: np.ndarray
    public_used: bool


def _public(obs: Observation) -> tuple[Tensor, Tensor] | None:
    entry = obs.side_info.get("public_data")
    if isinstance(entry, Mapping) and isinstance(entry.get("x"), Tensor):
        return entry["x"], entry["y"]  # type: ignore[return-value]
    return None


def _random_subsets(rows: int, available: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, available) bool: each row a fresh random `size`-subset."""
    keep = np.zeros((rows, available), dtype=bool)
    for row in keep:
        row[rng.choice(available, size=min(size, available), replace=False)] = True
    return keep


def shadow_data(
    obs: Observation, params: LiraParams, x: Tensor, y: Tensor, rng: np.random.Generator
) -> ShadowData:
    """Each shadow's training records: halves of the candidates, and public data if granted.

    Online: Carlini et al.'s balanced halves of the candidates (each IN for half the shadows);
    for ``final`` each shadow adds random public records up to the size of the federation's
    training data as far as the server knows it (the example counts of the round's updates).
    Offline: with public data, only public records (as many as the target trained on: the
    target's example count, or the federation's for ``final``); without, the balanced halves,
    of which only the OUT statistics are used.
    """
    n, shadows = x.shape[0], params.shadows
    public = _public(obs)
    counts = [u.num_examples for u in obs.updates]
    if params.target_model == "final":
        known = sum(counts) if counts else None
    else:
        update = obs.update_of(obs.target_client)
        known = update.num_examples if update is not None else None
    if params.mode == "offline" and public is not None:
        size = known if known else n // 2
        keep_public = _random_subsets(shadows, public[0].shape[0], size, rng)
        keep = np.concatenate([np.zeros((shadows, n), dtype=bool), keep_public], axis=1)
        return ShadowData(torch.cat([x, public[0]]), torch.cat([y, public[1]]), keep, True)
    halves = balanced_keep(shadows, n, rng)
    extra = (known or 0) - n // 2
    if params.target_model == "final" and public is not None and extra > 0:
        keep_public = _random_subsets(shadows, public[0].shape[0], extra, rng)
        keep = np.concatenate([halves, keep_public], axis=1)
        return ShadowData(torch.cat([x, public[0]]), torch.cat([y, public[1]]), keep, True)
    return ShadowData(x, y, halves, False)


@torch.no_grad()
def model_confidence(model: nn.Module, state: TensorDict, x: Tensor, y: Tensor) -> Tensor:
    """The scaled-logit confidence of every record under `state` (eval mode), float64 (N,)."""
    was = model.training
    model.eval()
    try:
        logits = [
            functional_call(model, state, (x[i : i + CHUNK],)) for i in range(0, len(x), CHUNK)
        ]
    finally:
        model.train(was)
    return logit_confidence(torch.cat(logits), y)


class LiraAttack(Infers):
    """LiRA membership inference (Carlini et al., IEEE S&P 2022) with vectorised shadows.

    The adversary (an honest-but-curious server that knows the architecture and the clients'
    hyperparameters) attacks either the target client's local model after the observed round
    (``target_model: local``: global + its update; the shadows start from the same global model
    and run the client's local training on halves of the candidates) or the federation's final
    model (``final``). For ``final`` the shadows approximate the federation by central SGD from
    the initial model for rounds x local epochs, on half of the candidates plus, when granted,
    public records standing in for the other clients' data; the federation's client sampling,
    averaging and non-IID data are not imitated.

    Scores are :func:`lira_online` or :func:`lira_offline` of the candidates' scaled-logit
    confidences, one per candidate in ``side_info["candidates"]`` order, higher meaning member.
    """

    name: ClassVar[str] = "lira"
    question: ClassVar[Question | None] = "membership"
    needs_history: ClassVar[bool] = False

    def __init__(self, params: LiraParams | None = None) -> None:
        self.params = params or LiraParams()

    def _setup(self, obs: Observation) -> tuple[Schedule, TargetModel] | str:
        """The shadows' schedule and the attacked model, or the reason the attack cannot run."""
        reason = unanswerable(obs)
        if reason is not None:
            return reason
        schedule, reason = shadow_schedule(self.params, obs)
        if schedule is None:
            return str(reason)
        target, reason = attacked_model(obs, self.params, schedule.lr)
        return (schedule, target) if target is not None else str(reason)

    def applicable(self, obs: Observation, model: nn.Module | None = None) -> str | None:
        """None when the candidates, the architecture, the attacked model and the shadows'
        schedule are at hand (and, with `model` given, the model has no BatchNorm)."""
        if model is not None and has_batchnorm(model):
            return BATCHNORM
        setup = self._setup(obs)
        return setup if isinstance(setup, str) else None

    def run(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None = None,
    ) -> AttackResult:
        """Not applicable to a model with BatchNorm; otherwise `Infers.run`."""
        if has_batchnorm(model):
            return not_applicable(self.name, obs, BATCHNORM)
        return super().run(obs, model, rng=rng, progress=progress)

    def infer(
        self,
        obs: Observation,
        model: nn.Module,
        *,
        rng: torch.Generator,
        progress: ProgressFn | None,
    ) -> tuple[Tensor, dict[str, object]]:
        """Train the shadows, then score every candidate."""
        setup = self._setup(obs)
        if isinstance(setup, str):
            raise ValueError(setup)
        schedule, target = setup
        p = self.params
        x, y = candidates(obs)  # type: ignore[misc]
        numpy_rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=rng)))
        data = shadow_data(obs, p, x, y, numpy_rng)
        started = time.perf_counter()
        stacked = train_shadows(
            model,
            target.init,
            data.x,
            data.y,
            data.keep,
            optimizer=schedule.optimizer,
            lr=schedule.lr,
            batch_size=schedule.batch_size,
            epochs=schedule.epochs,
            steps=schedule.steps,
            rng=numpy_rng,
            progress=progress,
        )
        shadow_seconds = time.perf_counter() - started
        shadow_conf = logit_confidence(shadow_logits(model, stacked, x), y)
        target_conf = model_confidence(model, target.state, x, y)
        keep = data.keep[:, : x.shape[0]]
        score = lira_online if p.mode == "online" else lira_offline
        scores = score(target_conf, shadow_conf, keep, fixed_variance=p.variance == "fixed")
        details: dict[str, object] = {
            "shadows": p.shadows,
            "shadow_seconds": round(shadow_seconds, 3),
            "mode": p.mode,
            "variance": p.variance,
            "target_model": target.how,
            "shadow_training": schedule.describe(),
            "shadow_records": float(data.keep.sum(axis=1).mean()),
            "public_data_used": data.public_used,
            "candidates_without_in": int((keep.sum(axis=0) == 0).sum()),
            "candidates_without_out": int((keep.sum(axis=0) == keep.shape[0]).sum()),
        }
        if p.target_model == "final":
            details["approximation"] = (
                "shadows imitate the federation by central SGD from the initial model on half "
                "of the candidates (plus public records for the other clients' data when "
                "granted); client sampling, averaging and non-IID data are not imitated"
            )
        return scores, details


__all__ = [
    "GaussianFit",
    "LiraAttack",
    "LiraParams",
    "Schedule",
    "attacked_model",
    "fit_gaussians",
    "lira_offline",
    "lira_online",
    "logit_confidence",
    "model_confidence",
    "shadow_data",
    "shadow_schedule",
]
