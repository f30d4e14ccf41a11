"""Bookkeeping every optimisation attack shares: anytime schedules and the best candidate seen.

An attack runs `iterations` steps or until `max_seconds`, whichever comes first, decays its step
size over whichever of the two runs out first (:class:`Clock`, :func:`schedule_factor`), and
keeps the best candidate it ever evaluated with a trace of its objective and best-so-far
snapshots for the report's PSNR-vs-seconds curve (:class:`BestSoFar`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gradaudit.attacks.base import ProgressFn

TRACE_POINTS = 200
"""Trace points an attack aims for over its planned steps (or its time budget)."""


def schedule_factor(kind: str, fraction: float) -> float:
    """The learning-rate multiplier at `fraction` (0 to 1) of a run.

    ``step`` divides by 10 at 3/8, 5/8 and 7/8 (Geiping et al.), ``cosine`` anneals to 0,
    ``constant`` keeps 1. The fraction is of the iterations or of the time budget, whichever is
    further along, so a run cut short by ``max_seconds`` still decays its step size.

    Example:
        >>> [schedule_factor("step", f) for f in (0.0, 0.5, 0.9)]
        [1.0, 0.1, 0.001...]
        >>> schedule_factor("cosine", 0.5)
        0.5
    """
    fraction = min(max(fraction, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * fraction))
    if kind == "step":
        return 0.1 ** sum(fraction >= f for f in (3 / 8, 5 / 8, 7 / 8))
    return 1.0


def set_learning_rates(
    optimiser: torch.optim.Optimizer, bases: Sequence[float], factor: float
) -> None:
    """Set each parameter group's learning rate to its base times `factor`."""
    for group, base in zip(optimiser.param_groups, bases, strict=True):
        group["lr"] = base * factor


@dataclass(frozen=True)
class Clock:
    """One stage's (or restart's) plan: `steps` steps or `budget` seconds from `begun`."""

    begun: float
    steps: int
    budget: float | None

    @classmethod
    def start(cls, steps: int, deadline: float | None, shares: int = 1) -> Clock:
        """A plan for `steps` steps and an equal share (of `shares`) of the time left."""
        now = time.perf_counter()
        return cls(now, steps, (deadline - now) / shares if deadline is not None else None)

    def fraction(self, step: int) -> float:
        """How far along the plan is before `step` (from 0): by steps or by time."""
        done = step / self.steps
        if self.budget is not None and self.budget > 0:
            done = max(done, (time.perf_counter() - self.begun) / self.budget)
        return done

    def out_of_time(self) -> bool:
        """Whether the time share is spent."""
        return self.budget is not None and time.perf_counter() >= self.begun + self.budget


@dataclass
class BestSoFar:
    """The best candidate of a whole attack (all restarts and stages), its trace and snapshots.

    Attributes:
        started: ``time.perf_counter()`` when the attack started.
        total: steps planned over all restarts and stages (for progress and the trace).
        to_pixels: maps a candidate to pixel space [0, 1] for the snapshots.
        snapshots: best-so-far reconstructions wanted over the run (0 = none).
        max_seconds: the attack's time budget, if any: snapshots and trace points then also
            come at even intervals of time.
        progress: the attack's progress callback.
    """

    started: float
    total: int
    to_pixels: Callable[[Tensor], Tensor]
    snapshots: int = 0
    max_seconds: float | None = None
    progress: ProgressFn | None = None
    done: int = 0
    trace: list[tuple[int, float, float]] = field(default_factory=list)
    kept: list[tuple[float, Tensor]] = field(default_factory=list)
    _best: tuple[float, Tensor] | None = None

    @property
    def lowest(self) -> float:
        """The lowest objective offered so far (inf before the first)."""
        return self._best[0] if self._best is not None else math.inf

    def offer(self, x: Tensor, cost: float, *, final: bool = False) -> None:
        """Record one step's candidate `x` and its objective; `final` marks a run's last step."""
        self.done += 1
        if self._best is None or cost < self._best[0]:
            self._best = (cost, x.detach().clone())
        seconds = time.perf_counter() - self.started
        if final or self._trace_due(seconds):
            self.trace.append((self.done, seconds, cost))
        if self.snapshots and (final or self._snapshot_due(seconds)):
            self.kept.append((seconds, self.to_pixels(self._best[1])))
        if self.progress is not None:
            self.progress(self.done, self.total)

    def _trace_due(self, seconds: float) -> bool:
        every = max(1, self.total // TRACE_POINTS)
        if self.done == 1 or self.done % every == 0 or self.done == self.total:
            return True
        interval = self.max_seconds / TRACE_POINTS if self.max_seconds else None
        return bool(interval and self.trace and seconds - self.trace[-1][1] >= interval)

    def _snapshot_due(self, seconds: float) -> bool:
        if self.done % max(1, self.total // self.snapshots) == 0:
            return True
        interval = self.max_seconds / self.snapshots if self.max_seconds else None
        last = self.kept[-1][0] if self.kept else 0.0
        return bool(interval and seconds - last >= interval)

    def best(self) -> tuple[Tensor, float]:
        """The best candidate seen and its objective."""
        if self._best is None:
            raise RuntimeError("no candidate was offered")
        return self._best[1], self._best[0]

    def final_snapshots(self) -> tuple[tuple[float, Tensor], ...]:
        """The snapshots, ending with the returned reconstruction."""
        if not self.snapshots or self._best is None:
            return ()
        last = self.to_pixels(self._best[1])
        if not self.kept or not torch.equal(self.kept[-1][1], last):
            self.kept.append((time.perf_counter() - self.started, last))
        return tuple(self.kept)
