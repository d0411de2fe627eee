"""Per-key scoring against the real database, in process: both payload shapes, independent model
state per (device, key), redelivery of a multi-key reading, and migration V4 over existing rows.
(test_pipeline.py follows multi-key readings end to end, through the bus and the ingestion API.)"""

from __future__ import annotations

import json
import random
import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ai_inference import store
from ai_inference.db import MIGRATIONS_DIR, connect, migrate
from ai_inference.envelope import Reading, decode
from ai_inference.model import DeviceModel, DeviceState, ModelParams
from conftest import Database, multi_reading, reading

PARAMS = ModelParams(threshold=4.0, warmup=30, horizon=1000)
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def decoded(env: dict[str, Any]) -> Reading:
    item = decode(json.dumps(env).encode(), None)
    assert isinstance(item, Reading)
    return item


def score(db: Database, env: dict[str, Any]) -> list[store.Result]:
    with connect(db.url, autocommit=True) as conn:
        return store.score_and_store(conn, decoded(env), PARAMS)


def models(db: Database) -> dict[tuple[str, str], tuple[int, float, float, float]]:
    rows = db.rows("SELECT device_id, key, readings, n, mean, variance FROM ai.device_models")
    return {(r[0], r[1]): (r[2], r[3], r[4], r[5]) for r in rows}


def series(n: int, mean: float, sd: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [round(rng.gauss(mean, sd), 3) for _ in range(n)]


@pytest.fixture
def db(database: Database) -> Database:
    migrate(database.url)
    return database


def test_both_payload_shapes_are_scored(db: Database) -> None:
    legacy = reading("dev-s", 21.0, T0)
    metric = reading("dev-s", 0, T0, payload={"value": 3.5, "unit": "bar", "metric": "pressure"})
    multi = multi_reading("dev-s", {"temperature": 21.5, "humidity": 40.2}, T0, units={"temperature": "c"})

    assert [(r.key, r.value, r.new) for r in score(db, legacy)] == [("value", 21.0, True)]
    assert [(r.key, r.value, r.new) for r in score(db, metric)] == [("pressure", 3.5, True)]
    assert [(r.key, r.value, r.new) for r in score(db, multi)] == [
        ("temperature", 21.5, True),
        ("humidity", 40.2, True),
    ]
    rows = db.rows("SELECT event_id::text, key, device_id, value FROM ai.inference_results ORDER BY value")
    assert rows == [
        (metric["event_id"], "pressure", "dev-s", 3.5),
        (legacy["event_id"], "value", "dev-s", 21.0),
        (multi["event_id"], "temperature", "dev-s", 21.5),
        (multi["event_id"], "humidity", "dev-s", 40.2),
    ]
    # One model per key of the device, each with the one reading it learned.
    assert {k: v[0] for k, v in models(db).items()} == {
        ("dev-s", "value"): 1,
        ("dev-s", "pressure"): 1,
        ("dev-s", "temperature"): 1,
        ("dev-s", "humidity"): 1,
    }
    # A legacy metric and a values key of the same name share one model.
    score(db, multi_reading("dev-s", {"pressure": 3.6}, T0 + timedelta(seconds=1)))
    assert models(db)[("dev-s", "pressure")][0] == 2


def test_an_outlier_on_one_key_does_not_disturb_another(db: Database) -> None:
    temps, hums = series(60, 21.0, 0.3, seed=1), series(60, 40.0, 1.0, seed=2)
    for i, (t, h) in enumerate(zip(temps, hums, strict=True)):
        results = score(
            db, multi_reading("dev-k", {"temperature": t, "humidity": h}, T0 + timedelta(seconds=i))
        )
        assert not any(r.is_anomaly for r in results)
    before = models(db)

    outlier = multi_reading("dev-k", {"temperature": 21.1, "humidity": 95.0}, T0 + timedelta(seconds=60))
    verdicts = {r.key: r for r in score(db, outlier)}
    assert verdicts["humidity"].is_anomaly and verdicts["humidity"].score > 4.0
    assert not verdicts["temperature"].is_anomaly and verdicts["temperature"].score < 1.0
    flagged = db.rows("SELECT event_id::text, key FROM ai.inference_results WHERE is_anomaly")
    assert flagged == [(outlier["event_id"], "humidity")]

    # temperature's model is exactly what its own series alone makes it: the humidity values,
    # the outlier among them, never reached it.
    alone = DeviceModel(PARAMS)
    for t in [*temps, 21.1]:
        alone.learn(t)
    s = alone.state()
    assert models(db)[("dev-k", "temperature")] == pytest.approx((s.readings, s.n, s.mean, s.variance))
    # humidity learned the outlier winsorised; temperature moved by its one ordinary value only.
    hum_before, hum_after = before[("dev-k", "humidity")], models(db)[("dev-k", "humidity")]
    assert hum_after[0] == hum_before[0] + 1 and hum_after[2] - hum_before[2] < 0.2

    # The next ordinary temperature is still ordinary.
    nxt = multi_reading("dev-k", {"temperature": 21.0, "humidity": 40.0}, T0 + timedelta(seconds=61))
    assert not any(r.is_anomaly for r in score(db, nxt))


def test_a_redelivered_multi_key_reading_learns_nothing_twice(db: Database) -> None:
    for i in range(40):
        score(
            db, multi_reading("dev-r", {"a": 1.0 + i % 3 / 10, "b": 5.0 + i % 2}, T0 + timedelta(seconds=i))
        )
    env = multi_reading("dev-r", {"a": 9.0, "b": 5.5}, T0 + timedelta(seconds=40))
    first = score(db, env)
    assert [(r.key, r.new) for r in first] == [("a", True), ("b", True)]
    assert [r.is_anomaly for r in first] == [True, False]
    state, count = models(db), db.count("ai.inference_results")

    for _ in range(3):
        again = score(db, env)
        assert [(r.key, r.new) for r in again] == [("a", False), ("b", False)]
        # Answered from the stored results: the same scores, so the same anomalies.
        assert [(r.score, r.is_anomaly, r.value) for r in again] == [
            (r.score, r.is_anomaly, r.value) for r in first
        ]
    assert models(db) == state
    assert db.count("ai.inference_results") == count
    # Its keys in another order (a replay from jsonb sorts them) are the same reading.
    reordered = multi_reading(
        "dev-r", {"b": 5.5, "a": 9.0}, T0 + timedelta(seconds=40), event_id=env["event_id"]
    )
    assert {r.key: r.new for r in score(db, reordered)} == {"a": False, "b": False}
    assert models(db) == state


def test_migration_v4_keeps_existing_rows(database: Database, tmp_path: Path) -> None:
    # The schema as it was before V4, with rows in it.
    before = tmp_path / "migrations"
    before.mkdir()
    for f in MIGRATIONS_DIR.glob("V[123]__*.sql"):
        shutil.copy(f, before / f.name)
    assert migrate(database.url, before) == [1, 2, 3]
    old_id, metric_id = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(database.url, autocommit=True) as conn:
        for event_id, v in ((old_id, 20.0), (metric_id, 21.0)):
            conn.execute(
                """INSERT INTO ai.inference_results
                       (event_id, device_id, time, value, score, is_anomaly, model, model_version)
                   VALUES (%s, 'dev-m', %s, %s, 0.5, false, 'river-welford-zscore', '1')""",
                (event_id, T0, v),
            )
        conn.execute(
            """INSERT INTO ai.device_models (device_id, model, model_version, readings, n, mean, variance)
               VALUES ('dev-m', 'river-welford-zscore', '1', 50, 50, 20.5, 0.25)"""
        )

    assert migrate(database.url) == [4]
    assert database.rows("SELECT event_id, key, value FROM ai.inference_results ORDER BY value") == [
        (old_id, "value", 20.0),
        (metric_id, "value", 21.0),
    ]
    assert models(database) == {("dev-m", "value"): (50, 50.0, 20.5, 0.25)}
    pkeys = dict(
        database.rows(
            """SELECT c.conrelid::regclass::text, array_agg(a.attname ORDER BY k.n)::text
                 FROM pg_constraint c, unnest(c.conkey) WITH ORDINALITY k(att, n), pg_attribute a
                WHERE c.contype = 'p' AND a.attrelid = c.conrelid AND a.attnum = k.att
                  AND c.conrelid::regclass::text IN ('ai.inference_results', 'ai.device_models')
                GROUP BY c.conrelid"""
        )
    )
    assert pkeys == {"ai.inference_results": "{event_id,key}", "ai.device_models": "{device_id,key}"}
    indexes = {r[0] for r in database.rows("SELECT indexname FROM pg_indexes WHERE schemaname = 'ai'")}
    assert {"idx_inference_results_device_time", "idx_inference_results_device_key_time"} <= indexes
    assert migrate(database.url) == []

    # The old readings redelivered are answered from their rows, a legacy one naming a metric
    # included (its row was stored under 'value'): nothing learned twice.
    legacy = reading("dev-m", 20.0, T0, event_id=str(old_id))
    named = reading(
        "dev-m", 0, T0, event_id=str(metric_id), payload={"value": 21.0, "unit": "c", "metric": "t"}
    )
    assert [(r.key, r.new) for r in score(database, legacy)] == [("value", False)]
    assert [(r.key, r.new) for r in score(database, named)] == [("value", False)]
    assert models(database) == {("dev-m", "value"): (50, 50.0, 20.5, 0.25)}
    assert database.count("ai.inference_results") == 2
    # The device's model continues under key 'value' where it stopped.
    [r] = score(database, reading("dev-m", 20.6, T0 + timedelta(seconds=1)))
    assert r.new and r.score == pytest.approx(abs(20.6 - 20.5) / 0.5)
    expected = DeviceModel(PARAMS, DeviceState(50, 50, 20.5, 0.25))
    expected.learn(20.6)
    assert models(database)[("dev-m", "value")][0] == expected.state().readings == 51
