"""The anomaly model: deterministic, scores before it learns, robust to the anomalies it sees."""

from __future__ import annotations

import math
import random

import pytest

from ai_inference.model import DeviceModel, DeviceState, ModelParams

PARAMS = ModelParams(threshold=4.0, warmup=30, horizon=1000)


def normal_series(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    return [round(20 + rng.gauss(0, 0.5), 3) for _ in range(n)]


def run(values: list[float], params: ModelParams = PARAMS) -> tuple[list[tuple[float, bool]], DeviceState]:
    m = DeviceModel(params)
    out = []
    for x in values:
        v = m.score(x)
        m.learn(x)
        out.append((v.score, v.is_anomaly))
    return out, m.state()


def test_same_readings_same_scores() -> None:
    values = normal_series(7, 300) + [35.0]
    assert run(values) == run(values)


def test_normal_readings_pass_and_an_outlier_is_flagged() -> None:
    verdicts, _ = run(normal_series(7, 300) + [35.0])
    assert [i for i, (_, flagged) in enumerate(verdicts) if flagged] == [300]
    assert verdicts[300][0] > 20


def test_nothing_is_flagged_during_warm_up() -> None:
    verdicts, _ = run([20.0, 20.1, 19.9, 1e6, -1e6, 20.0])
    assert not any(flagged for _, flagged in verdicts)


def test_scoring_does_not_learn() -> None:
    m = DeviceModel(PARAMS)
    for x in normal_series(1, 50):
        m.learn(x)
    before = m.state()
    first = m.score(99.0)
    assert m.score(99.0) == first
    assert m.state() == before


def test_state_round_trips() -> None:
    a = DeviceModel(PARAMS)
    for x in normal_series(3, 100):
        a.learn(x)
    b = DeviceModel(PARAMS, a.state())
    assert b.state() == a.state()
    for x in [20.3, 19.2, 50.0]:
        assert a.score(x).score == pytest.approx(b.score(x).score, rel=1e-12)
        assert a.score(x).is_anomaly == b.score(x).is_anomaly
        a.learn(x)
        b.learn(x)
    # Variance is persisted, not Welford's sum of squares: equal to the last bits or so.
    assert a.state().variance == pytest.approx(b.state().variance, rel=1e-12)
    assert (a.state().readings, a.state().mean) == (b.state().readings, b.state().mean)


def test_an_anomaly_is_learned_only_as_far_as_the_threshold() -> None:
    m = DeviceModel(PARAMS)
    for x in normal_series(5, 300):
        m.learn(x)
    s = m.state()
    std = math.sqrt(s.variance)
    m.learn(1e9)
    after = m.state()
    # Winsorised at mean + threshold·std: one reading moves the mean by at most that / n.
    assert after.mean - s.mean <= PARAMS.threshold * std / after.n + 1e-12
    assert math.sqrt(after.variance) < 1.1 * std
    # A later normal reading is still judged normal.
    assert not m.score(20.2).is_anomaly


def test_a_lasting_level_shift_is_adopted() -> None:
    m = DeviceModel(PARAMS)
    for x in normal_series(9, 200):
        m.learn(x)
    flags = []
    for x in normal_series(10, 400):
        v = m.score(x + 10)
        m.learn(x + 10)
        flags.append(v.is_anomaly)
    assert flags[0] and not any(flags[-100:])


def test_the_weight_of_history_is_capped() -> None:
    params = ModelParams(threshold=4.0, warmup=30, horizon=100)
    _, state = run(normal_series(2, 500), params)
    assert state.readings == 500 and state.n == 100


def test_a_constant_sensor_gets_finite_scores() -> None:
    m = DeviceModel(PARAMS)
    for _ in range(50):
        m.learn(7.0)
    assert not m.score(7.0).is_anomaly
    v = m.score(7.5)
    assert math.isfinite(v.score) and v.is_anomaly


def test_values_near_the_float_limit_do_not_poison_the_state() -> None:
    m = DeviceModel(PARAMS)
    m.learn(1e308)
    m.learn(-1e308)
    s = m.state()
    assert math.isfinite(s.mean) and math.isfinite(s.variance)
    assert math.isfinite(m.score(-1e308).score)
