"""An empirical lower bound on epsilon from canaries inserted in one training run.

A privacy audit turns an attack's success into a lower bound on the epsilon the run can have:
a mechanism that is (epsilon, delta)-DP cannot let an adversary guess too well whether records
were in its input. The accountant gives the upper bound; a lower bound far below it says the
analysis is loose (or the attack weak), and a lower bound *above* it means a bug.

Two bounds are here:

- :func:`one_run_epsilon_lower_bound`: Steinke, Nasr and Jagielski, "Privacy Auditing with One
  (1) Training Run", NeurIPS 2023. `m` canaries are each included independently with
  probability 1/2, *one* run is trained, and the auditor guesses in or out for `r` of them
  (abstaining on the rest). Their Theorem (the (epsilon, delta) tail bound, Corollary 5.4 /
  Appendix D of arXiv:2305.08846): under (epsilon, delta)-DP the number W of correct guesses
  satisfies ``P[W >= v] <= f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i`` with
  ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``; the bound is the largest epsilon that
  this p-value rejects at the given confidence.
- :func:`epsilon_from_rates`: the classical bound of Jagielski, Ullman and Oprea, "Auditing
  Differentially Private Machine Learning: How Private is Private SGD?", NeurIPS 2020, and Nasr
  et al., "Adversary Instantiation: Lower Bounds for Differentially Private Machine Learning",
  IEEE S&P 2021: ``epsilon >= log((1 - delta - FNR) / FPR)`` (and the symmetric one) with
  Clopper-Pearson upper bounds on both rates. Its trials must be independent (one run per
  trial), so it is not applied to the canaries of one run.

:func:`run_dp_audit` runs a separate copy of the scenario's federation with canaries (canary
clients for client-level DP, after Andrew, Kairouz, Oh, Oprea, McMahan and Suriyakumar,
"One-shot Empirical Privacy Estimation for Federated Learning", ICLR 2024; canary records for
example-level DP-SGD) and returns the report block.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.special
import scipy.stats
import torch
from torch import Tensor, nn

from gradaudit.attacks.signals import record_losses
from gradaudit.config import DpAuditSpec, Scenario
from gradaudit.data.base import Dataset
from gradaudit.defenses import build_defenses
from gradaudit.defenses.base import DefenseContext, DefenseStack
from gradaudit.defenses.client.dp_gaussian import default_delta
from gradaudit.defenses.server.base import AggregationProtocol
from gradaudit.errors import ConfigError
from gradaudit.federation.loop import CraftedClient, FederationResult, run_federation
from gradaudit.seeding import numpy_rng, torch_generator
from gradaudit.types import TensorDict

logger = logging.getLogger(__name__)

AuditLevel = Literal["client", "sample"]

GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
"""The positive-guess counts tried, as fractions of the canaries (fixed before any score is
seen; the confidence is split over them, see :func:`audit_scores`)."""

CANARY_NORM_OVER_CLIP = 100.0
"""A canary client's update norm over the clip norm: far past it, so clipping always bounds it
(also after adaptive clipping has raised the clip norm for many rounds)."""

MAX_CANARY_FLOATS = 250_000_000
"""Canary directions times model parameters above which a client-level audit is refused (the
directions, and each round's canary updates, are held in memory: 1 GB of float32)."""


# --------------------------------------------------------------------------- the bounds


def one_run_p_value(
    canaries: int, guesses: int, correct: int, *, epsilon: float, delta: float
) -> float:
    """The p-value of `correct` right guesses out of `guesses` under (epsilon, delta)-DP.

    Steinke, Nasr and Jagielski 2023, Corollary 5.4 (Appendix D's ``p_value_DP_audit``): with
    q = e^eps / (1 + e^eps) (the accuracy of epsilon-DP randomised response) and
    f(v) = P[Binomial(r, q) >= v], ``p = f(v) + 2 m delta max_{1<=i<=v} (f(v-i) - f(v)) / i``,
    capped at 1.

    Args:
        canaries: m, the canaries each included independently with probability 1/2.
        guesses: r, the guesses made (the rest abstained).
        correct: v, the correct guesses.
        epsilon: the null hypothesis' epsilon (>= 0).
        delta: its delta, in [0, 1].

    Returns:
        The probability of at least `correct` right guesses under the null hypothesis.
    """
    _check_counts(canaries, guesses, correct)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = float(scipy.special.expit(epsilon))
    tail = float(scipy.stats.binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return min(tail, 1.0)
    steps = np.arange(1, correct + 1)
    # f(v - i) - f(v) = P[v - i <= Binomial(r, q) < v] = cdf(v - 1) - cdf(v - i - 1)
    below = scipy.stats.binom.cdf(correct - 1, guesses, q) - scipy.stats.binom.cdf(
        correct - steps - 1, guesses, q
    )
    alpha = float(np.max(below / steps))
    return min(tail + 2 * canaries * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, *, delta: float, confidence: float
) -> float:
    """The largest epsilon that `correct` right guesses of `guesses` refute at `confidence`.

    Steinke, Nasr and Jagielski 2023 (Appendix D's ``get_eps_audit``): every epsilon below the
    result has a p-value (:func:`one_run_p_value`) under ``1 - confidence``, so with probability
    at least `confidence` the run is not (epsilon, delta)-DP for any such epsilon. Found by
    bisection that keeps the low end (never overstates).

    Example:
        With delta = 0 and every guess right the tail is q^r, so the bound is
        logit((1 - confidence)^(1/r)):

        >>> round(one_run_epsilon_lower_bound(1000, 100, 100, delta=0.0, confidence=0.95), 3)
        3.493

    Returns:
        The lower bound (0 when the guesses refute no epsilon).
    """
    _check_counts(canaries, guesses, correct)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1 - confidence

    def rejects(eps: float) -> bool:
        return one_run_p_value(canaries, guesses, correct, epsilon=eps, delta=delta) < level

    if correct == 0 or not rejects(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejects(high):
        low, high = high, 2 * high
        if high > 1e4:  # cannot happen for correct <= guesses; a guard against a bad input
            return low
    for _ in range(60):
        mid = (low + high) / 2
        if rejects(mid):
            low = mid
        else:
            high = mid
    return low


def clopper_pearson_upper(successes: int, trials: int, *, confidence: float) -> float:
    """The one-sided Clopper-Pearson upper confidence bound on a binomial proportion.

    ``Beta.ppf(confidence, k + 1, n - k)`` (1 when k = n): the largest p under which seeing k
    or fewer successes still has probability at least ``1 - confidence``.

    Example:
        >>> round(clopper_pearson_upper(0, 100, confidence=0.95), 4)
        0.0295
    """
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    if successes == trials:
        return 1.0
    return float(scipy.stats.beta.ppf(confidence, successes + 1, trials - successes))


def epsilon_from_rates(
    false_positives: int,
    negatives: int,
    false_negatives: int,
    positives: int,
    *,
    delta: float,
    confidence: float,
) -> float:
    """The classical epsilon lower bound from an attack's false positive and negative counts.

    Jagielski, Ullman and Oprea 2020; Nasr et al. 2021: an (epsilon, delta)-DP mechanism has
    ``FPR + e^eps FNR >= 1 - delta`` and ``FNR + e^eps FPR >= 1 - delta``, so
    ``eps >= log((1 - delta - FNR) / FPR)`` and ``eps >= log((1 - delta - FPR) / FNR)``. Each
    rate is replaced by its Clopper-Pearson upper bound at confidence ``1 - (1 - confidence)/2``
    (a union bound over the two), so the result holds with probability `confidence` when the
    trials are independent (a separate training run per trial).

    Args:
        false_positives: non-members the attack called members.
        negatives: non-members tested.
        false_negatives: members the attack called non-members.
        positives: members tested.
        delta: the delta of the guarantee under test.
        confidence: the bound's confidence.

    Returns:
        The larger of the two bounds, and 0 when neither is positive.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    each = 1 - (1 - confidence) / 2
    fpr = clopper_pearson_upper(false_positives, negatives, confidence=each)
    fnr = clopper_pearson_upper(false_negatives, positives, confidence=each)
    bounds = [0.0]
    for numerator_rate, denominator_rate in ((fnr, fpr), (fpr, fnr)):
        numerator = 1 - delta - numerator_rate
        if numerator > 0 and denominator_rate > 0:
            bounds.append(math.log(numerator / denominator_rate))
    return max(bounds)


def guesses_from_scores(scores: np.ndarray, *, k_plus: int, k_minus: int) -> np.ndarray:
    """The auditor's guesses: +1 (in) for the `k_plus` highest scores, -1 (out) for the
    `k_minus` lowest, 0 (abstain) elsewhere (Steinke et al., Algorithm 1, step 7).

    Ties are broken by position (a stable sort), so the guesses are deterministic.

    Example:
        >>> guesses_from_scores(np.array([0.1, 0.9, 0.5, 0.2]), k_plus=1, k_minus=1).tolist()
        [-1, 1, 0, 0]
    """
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.size
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need k_plus, k_minus >= 0 with k_plus + k_minus <= {m}")
    order = np.argsort(-scores, kind="stable")
    guesses = np.zeros(m, dtype=np.int8)
    guesses[order[:k_plus]] = 1
    if k_minus:
        guesses[order[m - k_minus :]] = -1
    return guesses


@dataclass(frozen=True)
class OneRunAudit:
    """The outcome of a one-run audit.

    Attributes:
        epsilon_lower_bound: the bound at `confidence` (0: nothing refuted).
        canaries: m.
        inserted: canaries actually included in the run.
        guesses: r of the chosen guess set.
        correct: its right guesses.
        k_plus: its positive guesses.
        k_minus: its negative guesses.
        choices: how many guess sets were tried (the confidence was split over them).
        confidence: the bound's overall confidence.
        delta: the delta of the bound.
    """

    epsilon_lower_bound: float
    canaries: int
    inserted: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    choices: int
    confidence: float
    delta: float


def guess_choices(canaries: int) -> list[tuple[int, int]]:
    """The (k_plus, k_minus) pairs tried for `canaries` canaries: k_minus = 0 and k_plus a
    fixed fraction of them (:data:`GUESS_FRACTIONS`), each at least 1, without repeats.

    Example:
        >>> guess_choices(1000)
        [(10, 0), (20, 0), (50, 0), (100, 0), (200, 0), (500, 0)]
    """
    picks = sorted({max(1, round(f * canaries)) for f in GUESS_FRACTIONS})
    return [(k, 0) for k in picks if k <= canaries]


def audit_scores(
    scores: np.ndarray,
    inserted: np.ndarray,
    *,
    delta: float,
    confidence: float,
    choices: Sequence[tuple[int, int]] | None = None,
) -> OneRunAudit:
    """The one-run bound of canary `scores` (higher: more likely inserted), best over `choices`.

    Steinke et al. guess "in" for the highest scores and abstain on the rest; how many to guess
    is a choice. Picking the best count after seeing the outcome is a multiple comparison, so
    the confidence is split evenly over the (k_plus, k_minus) pairs fixed in advance (a union
    bound: each pair's bound is computed at ``1 - (1 - confidence) / len(choices)``), which
    keeps the maximum valid at `confidence`. This is what the auditing library of the paper's
    group does over thresholds (``jax_privacy.auditing``, its default ``Bonferroni``
    strategy); the paper's experiments report the best of several guess counts.

    Args:
        scores: one score per canary.
        inserted: per canary, whether it was included in the run (the secret S).
        delta: the delta of the guarantee under test.
        confidence: the overall confidence.
        choices: the guess sets to try (default :func:`guess_choices`).
    """
    scores = np.asarray(scores, dtype=np.float64)
    inserted = np.asarray(inserted, dtype=bool)
    if scores.shape != inserted.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and inserted {inserted.shape} must be (m,)")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    m = scores.size
    tried = list(choices) if choices is not None else guess_choices(m)
    if not tried:
        raise ValueError("no guess counts to try")
    each = 1 - (1 - confidence) / len(tried)
    truth = np.where(inserted, 1, -1)
    best: OneRunAudit | None = None
    for k_plus, k_minus in tried:
        guesses = guesses_from_scores(scores, k_plus=k_plus, k_minus=k_minus)
        correct = int(np.sum(guesses == truth))
        bound = one_run_epsilon_lower_bound(
            m, k_plus + k_minus, correct, delta=delta, confidence=each
        )
        if best is None or bound > best.epsilon_lower_bound:
            best = OneRunAudit(
                bound,
                m,
                int(inserted.sum()),
                k_plus + k_minus,
                correct,
                k_plus,
                k_minus,
                len(tried),
                confidence,
                delta,
            )
    assert best is not None
    return best


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(
            f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}"
        )


# --------------------------------------------------------------------------- canaries


def canary_directions(model: nn.Module, count: int, *, generator: torch.Generator) -> Tensor:
    """`count` random unit vectors over the model's trainable parameters, (count, P) float32.

    Andrew et al. 2024: a canary client's update is a fixed random direction; in high
    dimension the directions are nearly orthogonal to each other and to the real updates, so
    the final model's alignment with a direction tells whether that canary took part. The
    directions are public (the auditor chose them); only which canaries were inserted is secret.
    """
    size = sum(p.numel() for p in model.parameters())
    directions = torch.randn(count, size, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True)


def direction_state(
    model: nn.Module, direction: Tensor, *, scale: float, template: TensorDict
) -> TensorDict:
    """`direction` times `scale` laid out like the model's state (buffers unchanged: zeros)."""
    out = {k: torch.zeros_like(v) for k, v in template.items()}
    offset = 0
    for name, param in model.named_parameters():
        n = param.numel()
        out[name] = (scale * direction[offset : offset + n]).view_as(param).to(param.dtype)
        offset += n
    return out


def parameter_vector(model: nn.Module, state: TensorDict) -> Tensor:
    """The trainable parameters of `state` as one float64 vector (the directions' layout)."""
    return torch.cat([state[name].flatten().double() for name, _ in model.named_parameters()])


def direction_cosines(directions: Tensor, change: Tensor) -> np.ndarray:
    """Cosine of each (unit) direction with `change` (0 when the model did not move)."""
    norm = float(change.norm())
    if norm == 0:
        return np.zeros(directions.shape[0])
    return (directions.double() @ change / norm).numpy()


def canary_records(
    dataset: Dataset, count: int, *, rng: np.random.Generator, generator: torch.Generator
) -> tuple[Tensor, Tensor, str]:
    """`count` records for an example-level audit, and what they are.

    Images: Gaussian-noise inputs (model space) with a random label: each is unlike every
    other record, so only its own presence lowers its loss (on digits under plain FedAvg their
    score AUC was 0.71 against 0.61 for mislabelled held-out digits). Tabular rows (whose
    categorical codes must stay valid): held-out rows with a random wrong label, drawn with
    replacement when the test split has fewer than `count`. No client holds any of them.
    """
    k = dataset.info.num_classes
    if dataset.info.modality == "image":
        x = torch.randn(count, *dataset.x_train.shape[1:], generator=generator)
        y = torch.as_tensor(rng.integers(0, k, size=count), dtype=torch.long)
        return x.to(dataset.x_train.dtype), y, "Gaussian-noise inputs with a random label"
    available = len(dataset.y_test)
    if available == 0:
        raise ValueError("dp_audit at sample level: the dataset has no held-out rows to use")
    repeat = count > available
    pick = torch.as_tensor(rng.choice(available, size=count, replace=repeat), dtype=torch.long)
    shift = torch.as_tensor(rng.integers(1, max(k, 2), size=count), dtype=torch.long)
    source = "held-out rows with a random wrong label" + (
        f" (drawn with replacement from {available})" if repeat else ""
    )
    return dataset.x_test[pick], (dataset.y_test[pick] + shift) % k, source


# --------------------------------------------------------------------------- the audit run

PartsFactory = Callable[[DefenseContext], tuple[DefenseStack, AggregationProtocol | None]]
"""Builds the client defenses and the aggregation protocol of the audit run from its context."""


@dataclass(frozen=True)
class CanaryRun:
    """The audit's federation: each canary's score, and what ran.

    Attributes:
        scores: per canary (inserted or not), higher meaning "inserted".
        defenses: the audit run's client defenses (their accountant spent what ran).
        result: the audit run's federation result.
        notes: sentences for the report.
    """

    scores: np.ndarray
    defenses: DefenseStack
    result: FederationResult
    notes: tuple[str, ...]


def scenario_parts(scenario: Scenario) -> PartsFactory:
    """The factory of `scenario`'s own defenses and protocol (what the audited run uses)."""

    return functools.partial(build_defenses, scenario.defenses)


def dp_level(scenario: Scenario) -> str | None:
    """The level of the scenario's ``dp_gaussian`` defense (None without one)."""
    for spec in scenario.defenses.client:
        if spec.kind == "dp_gaussian":
            return str(spec.params.get("level", "client"))
    return None


def audit_level(scenario: Scenario, requested: str) -> AuditLevel:
    """Which neighbours the audit tests: `requested`, or for ``auto`` the DP defense's level
    (``sample`` for DP-SGD; ``client`` for DP-FedAvg and local DP; ``client`` without DP)."""
    if requested in ("client", "sample"):
        return requested  # type: ignore[return-value]
    return "sample" if dp_level(scenario) == "sample" else "client"


def run_dp_audit(
    scenario: Scenario,
    dataset: Dataset,
    clients: Sequence[np.ndarray],
    *,
    build_model: Callable[[], nn.Module],
    build_parts: PartsFactory | None = None,
    spec: DpAuditSpec | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run the scenario's federation again with canaries and bound its epsilon from below.

    Client level (DP-FedAvg; Andrew et al. 2024): `spec.canaries` canary clients, each with a
    fixed random unit direction over the model's parameters and each included with probability
    1/2. An included canary joins the population (so the federation has more clients; a fixed
    cohort size grows in proportion, keeping the sampling rate) and, whenever sampled, sends its
    direction scaled far past the clip norm (:data:`CANARY_NORM_OVER_CLIP`; a unit-norm update
    when no defense clips updates), through the same client defenses, aggregation protocol and
    server noise as the real clients (FedSGD: the gradient that moves the model along it). A
    canary's score is the cosine between the final model change and its direction.

    Sample level (DP-SGD): `spec.canaries` canary records (:func:`canary_records`), each added
    with probability 1/2 to a random client's training data; a canary's score is minus its loss
    under the final model.

    The bound is :func:`audit_scores` at the DP defense's delta (without one, the default delta
    of the protected units). The audited run itself is untouched: this is a separate run.

    Args:
        scenario: the scenario (its ``dp_audit`` is the spec unless `spec` is given).
        dataset: the dataset, as the runner loaded and subsampled it.
        clients: per client, its indices into the training split (the runner's partition).
        build_model: a fresh model holding the scenario's initial weights.
        build_parts: builds the defenses and protocol from the audit run's context (default:
            the scenario's, via :func:`scenario_parts`).
        spec: the audit's settings (default ``scenario.dp_audit``, else the defaults).
        seed: the seed of the audit's random streams (default ``scenario.seed``).

    Returns:
        The report's ``dp_audit`` block (JSON-ready): epsilon_lower_bound, confidence, delta,
        level, canaries, inserted, guesses, correct, method, statistic, accountant_epsilon
        (None with a note when there is no accountant, or it bounds another level), seconds,
        and details of the run.

    Raises:
        ValueError: the audit cannot run (it says why): no client holds data for canary
            records, or the canary directions of a client-level audit would not fit in memory.
    """
    started = time.perf_counter()
    spec = spec or scenario.dp_audit or DpAuditSpec()
    seed = scenario.seed if seed is None else seed
    level = audit_level(scenario, spec.level)
    inserted = numpy_rng(seed, "dp_audit", "inserted").random(spec.canaries) < 0.5
    audit_run = _client_audit if level == "client" else _sample_audit
    run = audit_run(scenario, dataset, clients, inserted, build_model, build_parts, seed)
    statistic = (
        "cosine between the final model change and the canary client's direction "
        "(Andrew et al. 2024)"
        if level == "client"
        else "minus the canary record's cross-entropy under the final model"
    )
    notes = list(run.notes)
    reports = [d.privacy() for d in run.defenses.defenses]
    report = next((r for r in reports if r is not None), None)
    if report is not None:
        delta = report.delta
    else:  # the default delta of the protected units, as dp_gaussian would choose it
        units = len(clients) if level == "client" else sum(len(c) for c in clients)
        delta = default_delta(units)
    audit = audit_scores(run.scores, inserted, delta=delta, confidence=spec.confidence)
    accountant: float | None = None
    if report is None:
        notes.append(
            "no defense has a privacy accountant: the run has no epsilon to compare with; the "
            "lower bound shows how much it leaks without a guarantee"
        )
    elif level == "client" and report.level == "sample":
        notes.append(
            f"the accountant's epsilon ({report.epsilon:.3g}) is example-level; it bounds "
            "nothing about a client's whole data, which this audit tests"
        )
    else:
        accountant = report.epsilon if math.isfinite(report.epsilon) else None
        if level == "sample" and report.level == "client":
            notes.append(
                "the accountant's epsilon is client-level, which also bounds one record of a client"
            )
        if accountant is not None and audit.epsilon_lower_bound > accountant:
            notes.append(
                f"the lower bound {audit.epsilon_lower_bound:.3g} exceeds the accountant's "
                f"epsilon {accountant:.3g}: the guarantee does not hold as implemented"
            )
    logger.info(
        "dp_audit (%s level): epsilon >= %.3g at %.0f%% (delta %g), %d of %d guesses right",
        level,
        audit.epsilon_lower_bound,
        100 * spec.confidence,
        delta,
        audit.correct,
        audit.guesses,
    )
    return {
        "epsilon_lower_bound": audit.epsilon_lower_bound,
        "confidence": spec.confidence,
        "delta": delta,
        "level": level,
        "canaries": spec.canaries,
        "inserted": audit.inserted,
        "guesses": audit.guesses,
        "correct": audit.correct,
        "method": "one-run (Steinke et al. 2023)",
        "statistic": statistic,
        "accountant_epsilon": accountant,
        "accountant_level": report.level if report is not None else None,
        "guess_choices": audit.choices,
        "k_plus": audit.k_plus,
        "k_minus": audit.k_minus,
        "rounds_run": len(run.result.rounds),
        "stopped": run.result.stopped,
        "final_test_accuracy": run.result.rounds[-1].test_accuracy if run.result.rounds else None,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _clip_norm(scenario: Scenario) -> float | None:
    """The initial clip norm of a defense that clips whole updates (dp_gaussian at client or
    local level), else None."""
    for spec in scenario.defenses.client:
        if spec.kind == "dp_gaussian" and spec.params.get("level", "client") != "sample":
            return float(spec.params.get("clip_norm", 1.0))
    return None


def _client_audit(
    scenario: Scenario,
    dataset: Dataset,
    clients: Sequence[np.ndarray],
    inserted: np.ndarray,
    build_model: Callable[[], nn.Module],
    build_parts: PartsFactory | None,
    seed: int,
) -> CanaryRun:
    """Canary clients in the federation; each canary's cosine with the final model change."""
    model = build_model()
    size = sum(p.numel() for p in model.parameters())
    if len(inserted) * size > MAX_CANARY_FLOATS:
        raise ValueError(
            f"dp_audit.canaries: {len(inserted)} canary directions over {size:,} parameters "
            f"need {len(inserted) * size * 4 / 1e9:.1f} GB (limit "
            f"{MAX_CANARY_FLOATS * 4 / 1e9:.0f} GB); use fewer canaries"
        )
    directions = canary_directions(
        model, len(inserted), generator=torch_generator(seed, "dp_audit", "directions")
    )
    real = len(clients)
    members = np.flatnonzero(inserted)
    fed = scenario.federation
    if fed.clients_per_round is not None:  # keep each client's chance of being sampled
        cohort = max(1, round(fed.clients_per_round * (real + members.size) / real))
        fed = fed.model_copy(update={"clients_per_round": min(cohort, real + members.size)})
    indices = [*clients, *[np.zeros(0, np.int64)] * members.size]
    context = DefenseContext(model, fed, tuple(len(c) for c in indices), dataset.info, seed)
    try:
        defenses, protocol = (build_parts or scenario_parts(scenario))(context)
    except ConfigError as exc:
        raise ValueError(
            f"dp_audit: the defenses cannot run with {members.size} canary clients beside the "
            f"{real} real ones: {exc}"
        ) from None
    clip = _clip_norm(scenario)
    scale = CANARY_NORM_OVER_CLIP * clip if clip is not None else 1.0
    sign = -1.0 if fed.algorithm == "fedsgd" else 1.0  # a gradient moves the model against it
    template = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weight = max(1, round(float(np.mean([len(c) for c in clients])))) if real else 1
    crafted = {
        real + j: CraftedClient(
            update=_canary_update(model, directions[i], sign * scale, template),
            num_examples=weight,
        )
        for j, i in enumerate(members)
    }
    initial = parameter_vector(model, template)
    result = run_federation(
        model,
        dataset,
        indices,
        fed,
        seed=seed,
        defenses=defenses,
        protocol=protocol,
        crafted=crafted,
    )
    change = parameter_vector(model, result.final_state) - initial
    scores = direction_cosines(directions, change)
    notes = (
        f"{members.size} canary clients joined the {real} real ones"
        + (
            f"; the cohort grew to {fed.clients_per_round} to keep the sampling rate"
            if fed.clients_per_round is not None
            else ""
        ),
        f"canary update norm {scale:g}"
        + (" (far past the clip norm)" if clip is not None else " (no defense clips updates)"),
    )
    return CanaryRun(scores, defenses, result, notes)


def _canary_update(
    model: nn.Module, direction: Tensor, scale: float, template: TensorDict
) -> Callable[[int, TensorDict], TensorDict]:
    """A canary client's update: its direction times `scale` every round, whatever model it
    received (laid out when asked, so only the round's canaries occupy memory)."""

    def update(rnd: int, received: TensorDict) -> TensorDict:
        return direction_state(model, direction, scale=scale, template=template)

    return update


def _sample_audit(
    scenario: Scenario,
    dataset: Dataset,
    clients: Sequence[np.ndarray],
    inserted: np.ndarray,
    build_model: Callable[[], nn.Module],
    build_parts: PartsFactory | None,
    seed: int,
) -> CanaryRun:
    """Canary records in the clients' data; each canary's minus loss under the final model."""
    holders = [c for c, idx in enumerate(clients) if len(idx) > 0]
    if not holders:
        raise ValueError("dp_audit at sample level: no client holds training data to add to")
    rng = numpy_rng(seed, "dp_audit", "records")
    x_can, y_can, source = canary_records(
        dataset, len(inserted), rng=rng, generator=torch_generator(seed, "dp_audit", "records")
    )
    owner = rng.choice(holders, size=len(inserted))
    base = len(dataset.y_train)
    indices = [np.asarray(c, dtype=np.int64).copy() for c in clients]
    for i in np.flatnonzero(inserted):
        indices[owner[i]] = np.append(indices[owner[i]], base + i)
    augmented = dataclasses.replace(
        dataset,
        x_train=torch.cat([dataset.x_train, x_can.to(dataset.x_train.dtype)]),
        y_train=torch.cat([dataset.y_train, y_can]),
        groups_train=None,
    )
    model = build_model()
    context = DefenseContext(
        model, scenario.federation, tuple(len(c) for c in indices), augmented.info, seed
    )
    defenses, protocol = (build_parts or scenario_parts(scenario))(context)
    result = run_federation(
        model,
        augmented,
        indices,
        scenario.federation,
        seed=seed,
        defenses=defenses,
        protocol=protocol,
    )
    scores = -record_losses(model, result.final_state, x_can, y_can).numpy()
    notes = (f"canary records: {source}; each inserted one added to a random client's data",)
    return CanaryRun(scores, defenses, result, notes)


__all__ = [
    "CanaryRun",
    "OneRunAudit",
    "audit_level",
    "audit_scores",
    "canary_directions",
    "canary_records",
    "clopper_pearson_upper",
    "epsilon_from_rates",
    "guess_choices",
    "guesses_from_scores",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "run_dp_audit",
    "scenario_parts",
]
