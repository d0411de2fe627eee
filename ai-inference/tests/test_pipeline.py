"""End to end against the real broker, PostgreSQL and ingestion service: readings in, scores
stored, anomalies reported exactly once, poison dead-lettered, outages blocked and recovered."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from ai_inference.ids import anomaly_event_id
from conftest import (
    Bus,
    Database,
    Ingestion,
    Sidecars,
    TcpProxy,
    multi_reading,
    new_traceparent,
    reading,
    wait_for,
    with_port,
)

SEED = 7
NORMAL = 300
OUTLIER = 35.0


def normal_values(n: int, seed: int = SEED) -> list[float]:
    rng = random.Random(seed)
    return [round(20 + rng.gauss(0, 0.5), 3) for _ in range(n)]


def series_start(n: int) -> datetime:
    """Readings one second apart ending now (the ingestion API refuses times in the future)."""
    return datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=n + 5)


def results(db: Database, where: str = "TRUE") -> int:
    return db.count("ai.inference_results", where)


def anomalies_in_event_store(db: Database) -> list[tuple[Any, ...]]:
    return db.rows(
        "SELECT event_id, aggregate_id, event_time, payload, metadata FROM ingestion.event_store "
        "WHERE event_type = 'ai.anomaly'"
    )


def outbox_empty(db: Database) -> bool:
    return db.count("ingestion.outbox") == 0


def test_an_outlier_is_flagged_and_reported_exactly_once(
    database: Database, bus: Bus, ingestion: Ingestion, sidecars: Sidecars
) -> None:
    ai = sidecars.start(CJ_AI_INGEST_URL=ingestion.url)
    t0 = series_start(NORMAL + 1)
    envelopes = [reading("dev-1", v, t0 + timedelta(seconds=i)) for i, v in enumerate(normal_values(NORMAL))]
    tp = new_traceparent()
    outlier = reading("dev-1", OUTLIER, t0 + timedelta(seconds=NORMAL), traceparent=tp)
    for env in envelopes + [outlier]:
        bus.publish(env, key="dev-1")

    wait_for(lambda: results(database) == NORMAL + 1, 60, "301 results")
    flagged = database.rows("SELECT event_id, score FROM ai.inference_results WHERE is_anomaly")
    assert [str(r[0]) for r in flagged] == [outlier["event_id"]]
    assert flagged[0][1] > 4.0
    row = database.rows(
        "SELECT device_id, value, time, model, model_version FROM ai.inference_results WHERE event_id = %s",
        (outlier["event_id"],),
    )[0]
    assert row[0:2] == ("dev-1", OUTLIER)
    assert row[2] == datetime.fromisoformat(outlier["event_time"])
    assert row[3:] == ("river-welford-zscore", "1")

    # The ai.anomaly event went through the API, the outbox and into the event store.
    stored = wait_for(lambda: anomalies_in_event_store(database), 30, "the ai.anomaly event")
    assert len(stored) == 1
    event_id, aggregate_id, event_time, payload, metadata = stored[0]
    source_id = uuid.UUID(outlier["event_id"])
    assert event_id == anomaly_event_id(source_id, datetime.fromisoformat(outlier["event_time"]))
    assert aggregate_id == "dev-1"
    assert event_time == datetime.fromisoformat(outlier["event_time"])
    assert payload["source_event_id"] == outlier["event_id"]
    assert payload["device_id"] == "dev-1"
    assert payload["key"] == "value"  # a legacy reading's one quantity
    assert payload["value"] == OUTLIER
    assert payload["score"] == flagged[0][1]
    assert payload["threshold"] == 4.0
    assert payload["model"] == "river-welford-zscore@1"
    assert metadata["traceparent"] == tp  # the source's trace continues
    assert ai.metric("cj_ai_anomalies_total") == 1
    assert ai.metric("cj_ai_ingest_submissions_total", status="202") == 1

    # Redelivery 1: the same envelope published again.
    bus.publish(outlier, key="dev-1")
    wait_for(lambda: ai.metric("cj_ai_messages_total", outcome="redelivered") == 1, 30, "the redelivery")
    assert ai.metric("cj_ai_ingest_submissions_total", status="202") == 2  # answered, not stored
    wait_for(lambda: outbox_empty(database), 15, "an empty outbox")
    assert len(anomalies_in_event_store(database)) == 1
    assert ai.get("/model").json()["devices"] == {"dev-1": NORMAL + 1}

    # Redelivery 2: a restart that consumes everything again (a new group: offsets reset).
    assert ai.stop() == 0
    again = sidecars.start(CJ_AI_INGEST_URL=ingestion.url, CJ_AI_CONSUMER_GROUP=bus.group + "_replay")
    wait_for(
        lambda: again.metric("cj_ai_messages_total", outcome="redelivered") == NORMAL + 2,
        60,
        "every reading consumed again",
    )
    assert again.metric("cj_ai_messages_total", outcome="scored") == 0
    wait_for(lambda: outbox_empty(database), 15, "an empty outbox")
    assert len(anomalies_in_event_store(database)) == 1
    assert results(database) == NORMAL + 1
    # Nothing was learned twice.
    assert again.get("/model").json()["devices"] == {"dev-1": NORMAL + 1}

    # Latency of the path reading → score → ai.anomaly in the event store (ADR-0001 wants the
    # whole trigger path sub-second; the bound here is loose so a busy machine does not fail it).
    second = reading("dev-1", OUTLIER + 1, datetime.now(UTC) - timedelta(seconds=1))
    started = time.monotonic()
    bus.publish(second, key="dev-1")
    wait_for(lambda: results(database, "is_anomaly") == 2, 10, "the second outlier's result", 0.01)
    scored_s = time.monotonic() - started
    wait_for(lambda: len(anomalies_in_event_store(database)) == 2, 10, "its ai.anomaly event", 0.01)
    stored_s = time.monotonic() - started
    print(f"latency: scored {scored_s * 1000:.0f} ms, ai.anomaly in the event store {stored_s * 1000:.0f} ms")
    assert stored_s < 5


def test_a_multi_key_reading_is_scored_and_reported_per_key(
    database: Database, bus: Bus, ingestion: Ingestion, sidecars: Sidecars
) -> None:
    ai = sidecars.start(CJ_AI_INGEST_URL=ingestion.url, CJ_AI_WARMUP="10")
    n = 40
    t0 = series_start(n + 3)
    temps, hums = normal_values(n, seed=3), [round(v + 20, 3) for v in normal_values(n, seed=4)]
    units = {"temperature": "c", "humidity": "%"}
    for i, (temp, hum) in enumerate(zip(temps, hums, strict=True)):
        values = {"temperature": temp, "humidity": hum}
        bus.publish(multi_reading("dev-m", values, t0 + timedelta(seconds=i), units=units), key="dev-m")
    # humidity alone is off; a legacy reading of the device has its own key, "value".
    outlier = multi_reading("dev-m", {"temperature": 20.0, "humidity": 90.0}, t0 + timedelta(seconds=n))
    bus.publish(outlier, key="dev-m")
    bus.publish(reading("dev-m", 1013.0, t0 + timedelta(seconds=n)), key="dev-m")

    wait_for(lambda: results(database) == 2 * n + 3, 60, "a result per key of every reading")
    flagged = database.rows("SELECT event_id::text, key, value FROM ai.inference_results WHERE is_anomaly")
    assert flagged == [(outlier["event_id"], "humidity", 90.0)]

    stored = wait_for(lambda: anomalies_in_event_store(database), 30, "the ai.anomaly event")
    assert len(stored) == 1
    event_id, _, event_time, payload, _ = stored[0]
    source = uuid.UUID(outlier["event_id"])
    assert event_id == anomaly_event_id(source, event_time, "humidity")
    assert event_id != anomaly_event_id(source, event_time)
    assert (payload["source_event_id"], payload["device_id"]) == (outlier["event_id"], "dev-m")
    assert (payload["key"], payload["value"], payload["threshold"]) == ("humidity", 90.0, 4.0)
    assert payload["score"] > 4.0 and payload["model"] == "river-welford-zscore@1"

    # Model state per (device, key); /model's old per-device count sums the keys.
    learned = {"temperature": n + 1, "humidity": n + 1, "value": 1}

    def per_key() -> dict[str, int]:
        return dict(database.rows("SELECT key, readings FROM ai.device_models WHERE device_id = 'dev-m'"))

    assert per_key() == learned
    model = ai.get("/model").json()
    assert model["keys"] == {"dev-m": learned}
    assert model["devices"] == {"dev-m": 2 * n + 3}
    assert (model["device_count"], model["model_count"], model["keys_truncated"]) == (1, 3, False)
    # /infer scores against one key's model (default "value", as before keys existed).
    temp = ai.post("/infer", json={"device_id": "dev-m", "key": "temperature", "value": 20.0}).json()
    assert (temp["key"], temp["is_anomaly"], temp["readings"]) == ("temperature", False, n + 1)
    hum = ai.post("/infer", json={"device_id": "dev-m", "key": "humidity", "value": 90.0}).json()
    assert (hum["key"], hum["is_anomaly"]) == ("humidity", True)
    default = ai.post("/infer", json={"device_id": "dev-m", "value": 20.0}).json()
    assert (default["key"], default["readings"], default["warming_up"]) == ("value", 1, True)
    for bad in ["", "1st", "a b", "a" * 65, 7, None]:
        r = ai.post("/infer", json={"device_id": "dev-m", "key": bad, "value": 1})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["details"][0]["field"] == "key"

    # Redelivered: nothing learned twice, the anomaly resubmitted under its id and not stored again.
    bus.publish(outlier, key="dev-m")
    wait_for(lambda: ai.metric("cj_ai_messages_total", outcome="redelivered") == 1, 30, "the redelivery")
    assert ai.metric("cj_ai_ingest_submissions_total", status="202") == 2
    wait_for(lambda: outbox_empty(database), 15, "an empty outbox")
    assert len(anomalies_in_event_store(database)) == 1
    assert per_key() == learned
    assert ai.get("/model").json()["keys"] == {"dev-m": learned}
    assert results(database) == 2 * n + 3

    # Two anomalous keys of one reading: two events, with distinct (deterministic) ids.
    both = multi_reading("dev-m", {"temperature": 35.0, "humidity": 99.0}, t0 + timedelta(seconds=n + 1))
    bus.publish(both, key="dev-m")

    def of_both() -> list[tuple[Any, ...]] | None:
        found = [a for a in anomalies_in_event_store(database) if a[3]["source_event_id"] == both["event_id"]]
        return found if len(found) == 2 else None

    two = wait_for(of_both, 30, "both ai.anomaly events")
    source = uuid.UUID(both["event_id"])
    assert {(a[0], a[3]["key"], a[3]["value"]) for a in two} == {
        (anomaly_event_id(source, two[0][2], "temperature"), "temperature", 35.0),
        (anomaly_event_id(source, two[0][2], "humidity"), "humidity", 99.0),
    }
    assert len(anomalies_in_event_store(database)) == 3
    assert ai.metric("cj_ai_anomalies_total") == 3
    assert ai.metric("cj_ai_readings_scored_total") == 2 * n + 5
    wait_for(lambda: bus.committed_total(bus.group) == n + 4, 15, "the commits")


def test_poison_is_dead_lettered_and_the_consumer_goes_on(
    database: Database, bus: Bus, sidecars: Sidecars
) -> None:
    ai = sidecars.start()
    t = series_start(10)
    good = reading("dev-p", 21.0, t)
    bad_value = reading("dev-p", "hot", t)
    both_shapes = reading(
        "dev-p", None, t, payload={"value": 21.0, "unit": "c", "values": {"temperature": 21.0}}
    )
    poison: list[bytes | dict[str, Any]] = [
        b"\xff\xfe\x00 not json at all",
        b'{"hello": "world"}',
        bad_value,
        reading("dev-p", True, t),
        b'{"event_id": "%s", "event_type": "sensor.reading", "aggregate_id": "dev-p", '
        b'"event_time": "2026-01-01T00:00:00Z", "payload": {"value": NaN, "unit": "c"}}'
        % str(uuid.uuid4()).encode(),
        # Both shapes at once, and a multi-key reading with a bad value.
        both_shapes,
        multi_reading("dev-p", {"temperature": 21.0, "humidity": "damp"}, t),
    ]
    skipped = [
        reading("dev-p", 1, t, event_type="sensor.status"),
        reading("dev-p", 1, t, event_type="ai.anomaly"),
    ]
    for m in poison + skipped + [good]:
        bus.publish(m, key="dev-p")  # one key, one partition: the good one comes last

    wait_for(lambda: results(database) == 1, 30, "the good reading's result")
    assert database.scalar("SELECT event_id::text FROM ai.inference_results") == good["event_id"]
    letters = database.rows(
        'SELECT consumer, topic, "partition", "offset", event_id::text, event_type, aggregate_id, '
        'event_payload, raw_payload, error_message, retry_count, status FROM ai.dlq ORDER BY "offset"'
    )
    assert len(letters) == len(poison)
    assert {r[0] for r in letters} == {bus.group}
    assert {r[1] for r in letters} == {bus.sensor_topic}
    assert len({r[2] for r in letters}) == 1
    assert [r[3] for r in letters] == sorted(r[3] for r in letters)
    assert all(r[10] == 0 and r[11] == "pending" for r in letters)
    # Undecodable bytes are kept as text, JSON as jsonb; envelope fields are lifted out.
    assert letters[0][7] is None and "not json" in letters[0][8] and "undecodable" in letters[0][9]
    assert letters[1][7] == {"hello": "world"} and "not an envelope" in letters[1][9]
    assert letters[2][4] == bad_value["event_id"] and letters[2][5] == "sensor.reading"
    assert letters[2][6] == "dev-p" and "finite number" in letters[2][9]
    assert letters[4][7] is None and "NaN" in letters[4][8]
    assert letters[5][4] == both_shapes["event_id"]
    assert letters[5][9] == "sensor.reading payload must have value or values, not both"
    assert letters[6][9] == "sensor.reading payload.values.humidity must be a finite number"

    assert ai.metric("cj_ai_dlq_total", reason="poison") == len(poison)
    assert ai.metric("cj_ai_messages_total", outcome="skipped") == len(skipped)
    # Everything, poison included, is committed.
    total = len(poison) + len(skipped) + 1
    wait_for(lambda: bus.committed_total(bus.group) == total, 15, "the commits")
    assert ai.get("/health").status_code == 200


def test_health_follows_the_database_and_the_consumer_recovers(
    database: Database, bus: Bus, sidecars: Sidecars, db_proxy: TcpProxy
) -> None:
    ai = sidecars.start(CJ_AI_DATABASE_URL=with_port(database.url, db_proxy.port))
    health = ai.get("/health").json()
    assert health["status"] == "healthy"
    assert health["checks"]["database"]["status"] == "healthy"
    assert health["checks"]["consumer"]["status"] == "healthy"
    # Readiness is the same deep check; liveness asks nothing.
    ready = ai.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "healthy"
    assert set(ready.json()["checks"]) == set(health["checks"])
    assert ai.get("/livez").json() == {"status": "alive"}

    db_proxy.cut()

    def unhealthy(path: str) -> Callable[[], dict[str, Any] | None]:
        def probe() -> dict[str, Any] | None:
            started = time.monotonic()
            r = ai.get(path)
            assert time.monotonic() - started < 3, "a health probe must answer promptly"
            return r.json() if r.status_code == 503 else None

        return probe

    report = wait_for(unhealthy("/health"), 10, "/health to turn 503")
    assert report["status"] == "unhealthy"
    assert report["checks"]["database"]["status"] == "unhealthy"
    report = wait_for(unhealthy("/readyz"), 10, "/readyz to turn 503")
    assert report["checks"]["database"]["status"] == "unhealthy"

    def alive() -> None:
        # The outage takes the sidecar out of traffic, never gets it restarted.
        started = time.monotonic()
        r = ai.get("/livez")
        assert time.monotonic() - started < 2, "liveness must not wait on the database"
        assert (r.status_code, r.json()) == (200, {"status": "alive"})

    alive()

    # A reading that arrives meanwhile waits: it is neither lost nor committed.
    env = reading("dev-h", 20.0, series_start(1))
    bus.publish(env, key="dev-h")
    wait_for(
        lambda: "blocked" in ai.get("/health").json()["checks"]["consumer"],
        20,
        "the consumer to report it is blocked",
    )
    assert bus.committed_total(bus.group) == 0
    alive()

    db_proxy.restore()
    wait_for(lambda: ai.get("/health").status_code == 200, 30, "/health to recover")
    assert ai.get("/readyz").status_code == 200
    wait_for(lambda: results(database) == 1, 30, "the waiting reading to be stored")
    wait_for(lambda: bus.committed_total(bus.group) == 1, 15, "its commit")
    assert ai.get("/health").json()["status"] == "healthy"


def test_infer_scores_without_learning(database: Database, bus: Bus, sidecars: Sidecars) -> None:
    ai = sidecars.start()
    t0 = series_start(40)
    for i, v in enumerate(normal_values(40, seed=11)):
        bus.publish(reading("dev-i", v, t0 + timedelta(seconds=i)), key="dev-i")
    wait_for(lambda: results(database) == 40, 30, "40 results")

    model = ai.get("/model").json()
    assert model["devices"] == {"dev-i": 40}
    assert (model["threshold"], model["warmup"], model["model"]) == (4.0, 30, "river-welford-zscore")

    normal = ai.post("/infer", json={"device_id": "dev-i", "value": 20.1})
    assert normal.status_code == 200, normal.text
    assert normal.json()["is_anomaly"] is False and normal.json()["readings"] == 40
    high = ai.post("/infer", json={"device_id": "dev-i", "value": 99}).json()
    assert high["is_anomaly"] is True and high["score"] > 4.0
    assert ai.post("/infer", json={"device_id": "dev-i", "value": 99}).json() == high
    unknown = ai.post("/infer", json={"device_id": "nobody", "value": 5}).json()
    assert (unknown["readings"], unknown["warming_up"], unknown["is_anomaly"]) == (0, True, False)

    # Nothing was learned.
    assert ai.get("/model").json()["devices"] == {"dev-i": 40}
    assert database.scalar("SELECT readings FROM ai.device_models WHERE device_id = 'dev-i'") == 40
    assert results(database) == 40

    for bad in [
        {"device_id": "dev-i"},
        {"value": 1},
        {"device_id": "dev-i", "value": "12"},
        {"device_id": "dev-i", "value": True},
        {"device_id": "dev-i", "value": None},
        {"device_id": "", "value": 1},
        {"device_id": "x" * 257, "value": 1},
        {"device_id": "dev-i", "value": 1, "extra": 1},
        [1, 2],
    ]:
        r = ai.post("/infer", json=bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"] == "invalid request" and r.json()["details"]
    for raw in [b"not json", b'{"device_id": "d", "value": 1e999}', b'{"device_id": "d", "value": NaN}']:
        r = ai.post("/infer", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.text)

    assert ai.metric("cj_ai_readings_scored_total") == 40
    assert ai.metric("cj_ai_partitions_assigned") == 3
    # librdkafka's statistics (every 2 s) give the lag once the commits are in.
    wait_for(lambda: ai.get("/health").json()["checks"]["consumer"]["lag"] == 0, 10, "a lag of 0")
    assert ai.metric("cj_ai_consumer_lag") == 0


def test_an_anomaly_the_api_refuses_is_dead_lettered(
    database: Database, bus: Bus, ingestion: Ingestion, sidecars: Sidecars
) -> None:
    ai = sidecars.start(CJ_AI_INGEST_URL=ingestion.url, CJ_AI_WARMUP="5")
    t0 = series_start(20)
    for i, v in enumerate(normal_values(10)):
        bus.publish(reading("dev-r", v, t0 + timedelta(seconds=i)), key="dev-r")
    # The API refuses event times more than 5 minutes ahead; the anomaly carries the source's.
    future = reading("dev-r", 90.0, datetime.now(UTC) + timedelta(hours=1))
    bus.publish(future, key="dev-r")
    after = reading("dev-r", 20.0, t0 + timedelta(seconds=11))
    bus.publish(after, key="dev-r")

    wait_for(lambda: results(database) == 12, 30, "12 results")
    letters = wait_for(
        lambda: database.rows("SELECT event_id::text, error_message FROM ai.dlq"), 15, "the dead letter"
    )
    assert len(letters) == 1
    assert letters[0][0] == future["event_id"]
    assert "400" in letters[0][1] and "event_time" in letters[0][1]
    assert ai.metric("cj_ai_dlq_total", reason="ingest_rejected") == 1
    assert ai.metric("cj_ai_ingest_submissions_total", status="400") == 1
    assert anomalies_in_event_store(database) == []
    wait_for(lambda: bus.committed_total(bus.group) == 12, 15, "the commits")


def test_refused_credentials_block_until_fixed(
    database: Database, bus: Bus, ingestion: Ingestion, sidecars: Sidecars
) -> None:
    wrong = sidecars.start(CJ_AI_INGEST_URL=ingestion.url, CJ_AI_WARMUP="5", CJ_AI_INGEST_TOKEN="not-a-token")
    t0 = series_start(10)
    for i, v in enumerate(normal_values(6)):
        bus.publish(reading("dev-a", v, t0 + timedelta(seconds=i)), key="dev-a")
    outlier = reading("dev-a", 90.0, t0 + timedelta(seconds=7))
    bus.publish(outlier, key="dev-a")

    wait_for(lambda: wrong.metric("cj_ai_ingest_submissions_total", status="401") >= 1, 30, "a 401")
    report = wait_for(
        lambda: (h := wrong.get("/health").json())["checks"]["ingest"]["status"] == "degraded" and h,
        10,
        "degraded",
    )
    assert report["status"] == "degraded" and "CJ_AI_INGEST_TOKEN" in report["checks"]["ingest"]["error"]
    assert results(database, "is_anomaly") == 1  # scored and stored, but not reported ...
    assert anomalies_in_event_store(database) == []
    assert bus.committed_total(bus.group) <= 6  # ... so not committed either
    assert wrong.stop() == 0

    fixed = sidecars.start(CJ_AI_INGEST_URL=ingestion.url, CJ_AI_WARMUP="5")  # mints its own token
    wait_for(lambda: len(anomalies_in_event_store(database)) == 1, 30, "the ai.anomaly event")
    assert fixed.metric("cj_ai_messages_total", outcome="redelivered") == 1
    wait_for(lambda: bus.committed_total(bus.group) == 7, 15, "the commits")
    assert results(database) == 7
