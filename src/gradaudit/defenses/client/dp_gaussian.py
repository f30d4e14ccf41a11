"""``dp_gaussian``: the Gaussian mechanism at sample, client or local level, with its accountant.

Three places to put the noise, three different guarantees:

- ``sample``: DP-SGD inside each client (Abadi et al., "Deep Learning with Differential
  Privacy", CCS 2016): Poisson-sampled local batches, every example's gradient clipped to
  `clip_norm`, Gaussian noise of std ``noise_multiplier * clip_norm`` on each step's sum. The
  update a client sends is already private for each of its examples, against every party (the
  server included). Accounted per client: its local steps, sampled at ``batch_size / n``,
  composed over the rounds it took part in.
- ``client``: DP-FedAvg (McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private
  Recurrent Language Models", ICLR 2018): each update clipped to `clip_norm`, Gaussian noise on
  the sum, the sum divided by the expected cohort size. The noise is added by the server
  (``noise: server``: the guarantee covers what the server releases, not what it sees) or shared
  among the clients (``noise: distributed``: each adds its share, so the guarantee holds against
  the server only with secure aggregation). Clipping may be fixed or adaptive (Andrew, Thakkar,
  McMahan & Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021).
  Accounted for every client every round, with the federation's client sampling.
- ``local``: each client clips its update and adds the full noise itself: local DP of the whole
  update against everyone, composed over the rounds the client took part in, with no
  amplification (the server sees who took part).

Per-client noise: ``cohorts`` give some clients a larger noise multiplier (clients holding
genomic or mental-health records, say). At sample and local level that client simply adds more
noise. At client level the noise on the sum is shared, so the client is clipped tighter instead:
clip ``std / z_k`` against a sum noise std ``std = z * C``, which gives it multiplier ``z_k``. The
report lists each client's epsilon when they differ.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gradaudit.defenses import CLIENT_DEFENSES
from gradaudit.defenses.accounting import (
    GaussianRound,
    PrivacyLedger,
    PrivacyReport,
    full_participation_warning,
)
from gradaudit.defenses.base import (
    ClientDefense,
    DefenseContext,
    DpSgd,
    LocalData,
    LocalTraining,
    RoundInfo,
    float_keys,
    with_tensors,
)
from gradaudit.defenses.dp import clip_update, next_clip_norm, update_noise_multiplier
from gradaudit.seeding import torch_generator
from gradaudit.types import ClientUpdate, TensorDict

logger = logging.getLogger(__name__)

WEAK_EPSILON = 10.0
"""Above this epsilon the report warns that the guarantee is weak."""


class Cohort(BaseModel):
    """Clients that get their own noise multiplier (e.g. those holding genomic data)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    clients: tuple[int, ...] = Field(min_length=1)
    noise_multiplier: float = Field(gt=0)
    label: str = Field("", description="why these clients need more noise (shown in the report)")


class DpGaussianParams(BaseModel):
    """Parameters of ``dp_gaussian``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    level: Literal["sample", "client", "local"] = Field(
        "client",
        description="sample: DP-SGD inside clients; client: DP-FedAvg (clip, noise on the "
        "sum); local: each client noises its own update",
    )
    clip_norm: float = Field(1.0, gt=0, description="L2 bound (per example or per update)")
    noise_multiplier: float = Field(1.0, gt=0, description="noise std / clip_norm")
    cohorts: tuple[Cohort, ...] = ()
    clipping: Literal["fixed", "adaptive"] = "fixed"
    target_unclipped_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0, description="adaptive clipping's step size")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="noise on the unclipped count (default: expected clients / 20)"
    )
    noise: Literal["server", "distributed"] = Field(
        "server", description="client level: who adds the noise on the sum"
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="default: min(1e-5, n^-1.1), n = examples or clients"
    )
    accountant: Literal["rdp", "pld"] = "rdp"
    neighbours: Literal["add_remove", "replace_one"] | None = Field(
        None,
        description="default add_remove; replace_one when clients are sampled in fixed-size "
        "cohorts at client level (the only relation dp-accounting supports there)",
    )
    max_epsilon: float | None = Field(
        None, gt=0, description="stop before the round that would take a client past it"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DpGaussianParams:
        if self.clipping == "adaptive" and self.level != "client":
            raise ValueError("clipping: adaptive applies to level: client (DP-FedAvg) only")
        if self.noise == "distributed" and self.level != "client":
            raise ValueError("noise: distributed applies to level: client only")
        seen: set[int] = set()
        for cohort in self.cohorts:
            if seen & set(cohort.clients):
                raise ValueError(f"client(s) {sorted(seen & set(cohort.clients))} in two cohorts")
            seen |= set(cohort.clients)
        return self


class DpGaussian(ClientDefense):
    """The Gaussian mechanism at the chosen level, and the ledger of what it cost.

    One object plays both halves of the protocol in the simulation: the clients' (clip, noise,
    report whether they were clipped) and the server's (noise on the sum, adapt the clip norm,
    account). Built by :func:`build_dp_gaussian`, which checks the run's settings.
    """

    name = "dp_gaussian"

    def __init__(self, params: DpGaussianParams, context: DefenseContext) -> None:
        self.params = params
        self.context = context
        self.multipliers = _client_multipliers(params, context.num_clients)
        self.level = params.level
        units = sum(context.client_sizes) if params.level == "sample" else context.num_clients
        self.delta = params.delta if params.delta is not None else default_delta(units)
        self.ledger = PrivacyLedger(
            level="sample" if params.level == "sample" else "client",
            delta=self.delta,
            accountant=params.accountant,
            neighbours=_neighbours(params, context),
        )
        self.clip_norm = params.clip_norm
        self.clip_history: list[float] = []
        self.count_stddev = params.clipped_count_stddev or context.expected_clients / 20
        self.update_multiplier = (
            update_noise_multiplier(params.noise_multiplier, self.count_stddev)
            if params.clipping == "adaptive"
            else params.noise_multiplier
        )
        self._unclipped: dict[int, bool] = {}
        self._unclipped_count = 0
        self.rounds_run = 0
        self.stopped: str | None = None
        self.guarantee = _guarantee(params)

    # ------------------------------------------------------------------ client side

    def local_training(self, client: int, rnd: int) -> LocalTraining | None:
        """DP-SGD with Poisson batches at sample level; plain training otherwise."""
        if self.level != "sample":
            return None
        return LocalTraining(
            dp_sgd=DpSgd(
                clip_norm=self.params.clip_norm,
                noise_multiplier=self.multipliers[client],
                expected_batch_size=self._expected_batch(client),
            ),
            poisson_batches=True,
        )

    def client_clip(self, client: int) -> float:
        """The clip norm `client` uses this round (client and local level)."""
        if self.level == "local":
            return self.params.clip_norm
        std = self.update_multiplier * self.clip_norm
        z_k = self.multipliers[client]
        count_part = (2 * self.count_stddev) ** -2 if self.params.clipping == "adaptive" else 0.0
        return std * math.sqrt(z_k**-2 - count_part)

    def transform(
        self, update: ClientUpdate, *, rng: torch.Generator, local: LocalData
    ) -> ClientUpdate:
        """Client and local level: clip the update (and noise it, where the client does)."""
        if self.level == "sample":
            return update
        keys = float_keys(update)
        clip = self.client_clip(update.client_id)
        tensors, norm = clip_update(update.tensors, keys, clip)
        self._unclipped[update.client_id] = norm <= clip
        std = 0.0
        if self.level == "local":
            std = self.multipliers[update.client_id] * clip
        elif self.params.noise == "distributed":
            std = self.update_multiplier * self.clip_norm / math.sqrt(self.context.expected_clients)
        if std > 0:
            tensors = {
                k: (v + std * torch.randn(v.shape, generator=rng) if k in keys else v)
                for k, v in tensors.items()
            }
        return with_tensors(update, tensors)

    # ------------------------------------------------------------------ server side

    def stop_reason(self, rnd: int, sampled: Sequence[int]) -> str | None:
        """Stop before the round that would take some client past `max_epsilon`."""
        limit = self.params.max_epsilon
        if limit is None or self.stopped is not None:
            return self.stopped
        planned = self._planned(sampled)
        over = [c for c, m in planned.items() if self.ledger.epsilon_of(c, [m]) > limit]
        if over:
            worst = max(self.ledger.epsilon_of(c, [planned[c]]) for c in over)
            self.stopped = (
                f"round {rnd} would take client {over[0]}'s epsilon to {worst:.3g} > "
                f"max_epsilon {limit:g} (delta {self.delta:g}); training stopped after round "
                f"{rnd - 1}"
            )
        return self.stopped

    def summand(self, update: ClientUpdate) -> tuple[TensorDict, dict[str, int]] | None:
        """Client level: the clipped (and, if distributed, noised) update, and whether it was
        within the clip norm (the adaptive-clipping count), summed without weights."""
        if self.level != "client":
            return None
        tensors = {k: update.tensors[k].to(torch.float64) for k in float_keys(update)}
        return tensors, {"unclipped": int(self._unclipped.get(update.client_id, False))}

    def from_sum(
        self,
        total: TensorDict,
        counts: Mapping[str, int],
        info: RoundInfo,
        *,
        rng: torch.Generator,
    ) -> TensorDict | None:
        """Client level: the sum, noised where the server adds the noise, over the expected
        cohort size. Noise goes on every tensor some update sent; a tensor no update carried
        (or a round no update reached) stays zero: nothing was computed from data."""
        if self.level != "client":
            return None
        self._unclipped_count = int(counts.get("unclipped", 0))
        expected = self.context.expected_clients
        out: TensorDict = {}
        for key, first in self.context.model.state_dict().items():
            if not first.is_floating_point():
                out[key] = torch.zeros_like(first)
                continue
            summed = total.get(key)
            acc = torch.zeros_like(first, dtype=torch.float64) if summed is None else summed.clone()
            if self.params.noise == "server" and summed is not None:
                std = self.update_multiplier * self.clip_norm
                acc += std * torch.randn(first.shape, generator=rng, dtype=torch.float64)
            out[key] = (acc / expected).to(first.dtype)
        return out

    def aggregate(
        self, updates: Sequence[ClientUpdate], info: RoundInfo, *, rng: torch.Generator
    ) -> TensorDict | None:
        """Client level: :meth:`from_sum` of the summands added in the clear."""
        if self.level != "client":
            return None
        total: TensorDict = {}
        counts: dict[str, int] = {}
        for update in updates:
            summand = self.summand(update)
            assert summand is not None
            tensors, stats = summand
            for key, tensor in tensors.items():
                total[key] = total[key] + tensor if key in total else tensor.clone()
            for name, value in stats.items():
                counts[name] = counts.get(name, 0) + value
        return self.from_sum(total, counts, info, rng=rng)

    def end_round(self, updates: Sequence[ClientUpdate], info: RoundInfo) -> None:
        """Account the round; adapt the clip norm from the noised unclipped count."""
        arrived = [u.client_id for u in updates]
        self.rounds_run += 1
        if self.level == "client":
            share = 1.0
            if self.params.noise == "distributed":
                share = math.sqrt(len(arrived) / self.context.expected_clients)
                if share < 1:
                    logger.warning(
                        "round %d: %d of %.0f expected clients sent their noise share; the sum "
                        "carries %.0f%% of the planned noise std",
                        info.round,
                        len(arrived),
                        self.context.expected_clients,
                        100 * share,
                    )
            for client in range(self.context.num_clients):
                if share > 0:
                    z = self.multipliers[client] * share
                    self.ledger.record(client, self._client_round(z))
            if self.params.clipping == "adaptive":
                self.clip_history.append(self.clip_norm)
                unclipped = self._unclipped_count
                self.clip_norm, _ = next_clip_norm(
                    self.clip_norm,
                    unclipped,
                    self.context.expected_clients,
                    target_unclipped_quantile=self.params.target_unclipped_quantile,
                    learning_rate=self.params.clip_learning_rate,
                    count_noise=self.count_stddev,
                    generator=torch_generator(self.context.seed, "adaptive_clipping", info.round),
                )
        else:
            for client in arrived:
                self.ledger.record(client, self._participant_round(client))
        self._unclipped.clear()
        self._unclipped_count = 0

    # ------------------------------------------------------------------ accounting

    def _expected_batch(self, client: int) -> float:
        size = self.context.client_sizes[client]
        return float(min(self.context.federation.local.batch_size, max(size, 1)))

    def _local_steps(self, client: int) -> int:
        fed = self.context.federation
        if fed.algorithm == "fedsgd":
            return 1
        if fed.local.steps is not None:
            return fed.local.steps
        size = max(self.context.client_sizes[client], 1)
        return (fed.local.epochs or 1) * -(-size // fed.local.batch_size)

    def _participant_round(self, client: int) -> GaussianRound:
        """The mechanism one participation costs `client` (sample and local level)."""
        z = self.multipliers[client]
        if self.level == "local":
            return GaussianRound(z, sampling="all")
        size = max(self.context.client_sizes[client], 1)
        rate = min(1.0, self.context.federation.local.batch_size / size)
        return GaussianRound(
            z, sampling="poisson", sample_rate=rate, count=self._local_steps(client)
        )

    def _client_round(self, z: float) -> GaussianRound:
        """One DP-FedAvg round for one client, with the federation's client sampling."""
        fed = self.context.federation
        if fed.sample_rate is not None:
            return GaussianRound(z, sampling="poisson", sample_rate=fed.sample_rate)
        if fed.clients_per_round is not None:
            return GaussianRound(
                z,
                sampling="fixed",
                sample_size=fed.clients_per_round,
                population=self.context.num_clients,
            )
        return GaussianRound(z, sampling="all")

    def _planned(self, sampled: Sequence[int]) -> dict[int, GaussianRound]:
        if self.level == "client":
            return {
                c: self._client_round(self.multipliers[c]) for c in range(self.context.num_clients)
            }
        return {c: self._participant_round(c) for c in sampled}

    def privacy(self) -> PrivacyReport | None:
        """The ledger's epsilon for what ran."""
        return self.ledger.report()

    def describe(self) -> dict[str, Any]:
        """Guarantee, settings, what it protects against, and plain warnings."""
        p = self.params
        report = self.privacy()
        notes = [_protects_against(p)]
        warnings: list[str] = []
        if p.level == "client":
            notes.append(
                "updates are averaged with equal weight over the expected cohort "
                f"({self.context.expected_clients:g} clients), as DP-FedAvg requires"
            )
            fed = self.context.federation
            everyone = fed.sample_rate is None and (
                fed.clients_per_round is None or fed.clients_per_round == self.context.num_clients
            )
            if everyone:
                warning = full_participation_warning(
                    self.context.num_clients, p.noise_multiplier, self.rounds_run, self.delta
                )
                if warning:
                    warnings.append(warning)
        if self.ledger.neighbours == "replace_one" and p.neighbours is None:
            notes.append(
                "accounted under replace-one neighbours: clients are sampled in fixed-size "
                "cohorts, which dp-accounting supports only with that relation"
            )
        if p.level == "sample":
            notes.append(
                "each update also carries the client's example count (for weighting), which the "
                "guarantee does not cover"
            )
        if report is not None and report.epsilon > WEAK_EPSILON:
            warnings.append(
                f"epsilon {report.epsilon:.3g} (delta {self.delta:g}) is above "
                f"{WEAK_EPSILON:g}: a formally valid but weak guarantee"
            )
        units = "examples" if p.level == "sample" else "clients"
        total = sum(self.context.client_sizes) if p.level == "sample" else self.context.num_clients
        if self.delta > 1 / total:
            warnings.append(
                f"delta {self.delta:g} exceeds 1/{total} (one over the number of {units}): "
                "a mechanism that leaks one record in full can meet it"
            )
        if self.stopped:
            notes.append(self.stopped)
        adaptive = (
            {
                "clip_norms": [*self.clip_history, self.clip_norm],
                "update_noise_multiplier": self.update_multiplier,
            }
            if p.clipping == "adaptive"
            else {}
        )
        return self.entry(notes, warnings, protects_against=notes[0], **adaptive)


def default_delta(units: int) -> float:
    """``min(1e-5, units^-1.1)``: below one over the number of protected units.

    Example:
        >>> default_delta(10), f"{default_delta(1_000_000):.2e}"
        (1e-05, '2.51e-07')
    """
    return min(1e-5, max(units, 1) ** -1.1)


def _neighbours(
    p: DpGaussianParams, context: DefenseContext
) -> Literal["add_remove", "replace_one"]:
    """The neighbouring relation: replace-one for fixed-size cohorts at client level."""
    fixed = p.level == "client" and context.federation.clients_per_round is not None
    if fixed and context.federation.clients_per_round < context.num_clients:
        if p.neighbours == "add_remove":
            raise ValueError(
                "clients sampled in fixed-size cohorts (federation.clients_per_round) are "
                "accounted under replace_one neighbours (dp-accounting's sampling without "
                "replacement supports no other); set neighbours: replace_one, or sample clients "
                "with federation.sample_rate (Poisson) for add_remove"
            )
        return "replace_one"
    return p.neighbours or "add_remove"


def _client_multipliers(params: DpGaussianParams, num_clients: int) -> list[float]:
    multipliers = [params.noise_multiplier] * num_clients
    for i, cohort in enumerate(params.cohorts):
        for client in cohort.clients:
            if not 0 <= client < num_clients:
                raise ValueError(
                    f"cohorts[{i}] names client {client}, but clients are 0..{num_clients - 1}"
                )
            multipliers[client] = cohort.noise_multiplier
    return multipliers


def _guarantee(p: DpGaussianParams) -> str:
    level = {"sample": "example-level", "client": "client-level", "local": "client-level local"}
    return f"({level[p.level]}) differential privacy, Gaussian mechanism, {p.accountant} accountant"


def _protects_against(p: DpGaussianParams) -> str:
    if p.level == "sample":
        return (
            "each client's update is private for each of its examples against every party, the "
            "server included (DP-SGD runs inside the client)"
        )
    if p.level == "local":
        return "each update is private on its own, against every party, the server included"
    if p.noise == "server":
        return (
            "the guarantee covers what the server releases (the global models); the server "
            "itself sees every clipped update without noise, so it does not protect an update "
            "from an honest-but-curious server"
        )
    return (
        "each client adds a 1/sqrt(cohort) share of the noise: the guarantee holds against the "
        "server only if it sees nothing but the sum (secure aggregation); an individual update "
        "carries little noise"
    )


@CLIENT_DEFENSES.register(
    "dp_gaussian",
    summary="Gaussian mechanism at sample (DP-SGD), client (DP-FedAvg) or local level, with an "
    "RDP/PLD accountant",
    params=DpGaussianParams,
)
def build_dp_gaussian(params: DpGaussianParams, context: DefenseContext) -> DpGaussian:
    """Check the run's settings and build the mechanism.

    Raises:
        ValueError: BatchNorm trained on batch statistics (its buffers would travel without
            clipping or noise, and per-example gradients are undefined), or a cohort names a
            client that does not exist.
    """
    from gradaudit.federation.local import has_batchnorm  # the loop imports defenses

    if has_batchnorm(context.model) and context.federation.local.batchnorm == "train":
        raise ValueError(
            "the model has BatchNorm trained on batch statistics, whose running-statistics "
            "changes would travel without clipping or noise; set federation.local.batchnorm: "
            "frozen, or use a model without BatchNorm (e.g. norm: group)"
        )
    return DpGaussian(params, context)
