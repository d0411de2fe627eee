"""The per-device, per-key online anomaly model.

Each quantity of each device (a reading's `payload.value`, or every entry of `payload.values`,
by key) has a running mean and variance of its values — River's `stats.Var`, which is
Welford's algorithm (numerically stable even for large values with a small spread, unlike the
E[x²] − E[x]² form of `stats.EWVar`). A reading's score is its distance from the mean in standard
deviations (|x − mean| / std); it is anomalous when the score exceeds the threshold, once that
key of the device has a warm-up count of readings behind it.

Why this and not HalfSpaceTrees or GaussianScorer: on one-dimensional values a z-score is exact,
deterministic (no random trees, no window boundaries), its threshold reads in standard deviations,
and its whole state is four numbers, so it is kept in PostgreSQL with each result and survives
restarts and partition moves between instances.

Scoring comes first, then learning. Learning is robust in two ways:
- after warm-up a reading is winsorised into mean ± threshold·std before it is learned, so one
  wild value moves the model by at most what a borderline value would (the anomaly is still
  recorded and reported with its full score); a lasting level shift is still adopted, gradually;
- the effective count is capped at `horizon`, so old history fades and the model follows slow
  drift instead of freezing after months of readings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib.metadata import version

from river import stats

MODEL_NAME = "river-welford-zscore"
# Bump when scoring or learning semantics change: stored states of another version are discarded.
MODEL_VERSION = "1"
LIBRARY = f"river {version('river')}"

# The spread is never taken as smaller than this, so a device that has sent one constant value does
# not turn a tiny change into an infinite score: 0.1% of the mean's magnitude, at least 1e-6.
REL_STD_FLOOR = 1e-3
ABS_STD_FLOOR = 1e-6
# Scores are reported finite (the ai.anomaly payload must hold finite numbers).
SCORE_CAP = 1e9


@dataclass(frozen=True)
class ModelParams:
    threshold: float = 4.0
    warmup: int = 30
    horizon: int = 1000


@dataclass(frozen=True)
class DeviceState:
    """What is persisted per device and key: `readings` learned in all, `n` their effective weight."""

    readings: int
    n: float
    mean: float
    variance: float


@dataclass(frozen=True)
class Verdict:
    score: float
    is_anomaly: bool
    warming_up: bool
    readings: int  # readings learned before the scored one


class DeviceModel:
    def __init__(self, params: ModelParams, state: DeviceState | None = None) -> None:
        self.params = params
        self._restore(state)

    def _restore(self, state: DeviceState | None) -> None:
        if state is None or state.readings == 0:
            self._var = stats.Var(ddof=1)
            self.readings = 0
        else:
            self._var = stats.Var._from_state(state.n, state.mean, state.variance, ddof=1)
            self.readings = state.readings

    def state(self) -> DeviceState:
        return DeviceState(
            readings=self.readings,
            n=float(self._var.n),
            mean=float(self._var.mean.get()),
            variance=float(self._var.get()),
        )

    def _spread(self) -> float:
        std = math.sqrt(max(self._var.get(), 0.0))
        return max(std, REL_STD_FLOOR * abs(self._var.mean.get()), ABS_STD_FLOOR)

    def score(self, x: float) -> Verdict:
        """Scores `x` against what has been learned; changes nothing."""
        warming_up = self.readings < self.params.warmup
        if self._var.n < 2:
            score = 0.0
        else:
            score = abs(x - self._var.mean.get()) / self._spread()
            score = min(score, SCORE_CAP) if math.isfinite(score) else SCORE_CAP
        return Verdict(
            score=score,
            is_anomaly=not warming_up and score > self.params.threshold,
            warming_up=warming_up,
            readings=self.readings,
        )

    def learn(self, x: float) -> None:
        before = self.state()
        if self.readings >= self.params.warmup:
            mean, bound = self._var.mean.get(), self.params.threshold * self._spread()
            x = min(max(x, mean - bound), mean + bound)
        self._var.update(x)
        if self._var.n > self.params.horizon:
            # Rescaling the weight keeps mean and variance and makes each new reading count as
            # 1/horizon of the history from here on: exponential forgetting.
            self._var = stats.Var._from_state(
                self.params.horizon, self._var.mean.get(), self._var.get(), ddof=1
            )
        after = self.state()
        if not (math.isfinite(after.mean) and math.isfinite(after.variance)):
            # A value near the float limits would poison the state for good: skip it instead.
            self._restore(before)
            return
        self.readings += 1
