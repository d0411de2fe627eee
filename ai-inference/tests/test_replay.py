"""Replays of `ai.dlq` requested the way `cornjacket dlq replay` does, against the real database
(the worker in-process) and end to end (the sidecar's own worker, the real ingestion service)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from ai_inference import store
from ai_inference.config import Settings, load_settings
from ai_inference.db import connect, migrate
from ai_inference.envelope import Reading, decode
from ai_inference.ingest import IngestClient
from ai_inference.metrics import Metrics
from ai_inference.model import ModelParams
from ai_inference.replay import NOT_JSON, Outage, Replay, ReplayWorker
from conftest import (
    Bus,
    Database,
    Ingestion,
    Sidecars,
    TcpProxy,
    free_port,
    reading,
    wait_for,
    with_port,
)

# Exactly what the platform's CLI runs to request a replay.
REQUEST_REPLAY = (
    "UPDATE ai.dlq SET status = 'replaying', updated_at = now() WHERE dlq_id = %s AND status = 'pending'"
)


def execute(db: Database, sql: str, params: tuple[Any, ...] = ()) -> int:
    with psycopg.connect(db.url, autocommit=True) as conn:
        return conn.execute(sql.encode(), params).rowcount


def request_replay(db: Database, dlq_id: uuid.UUID) -> int:
    return execute(db, REQUEST_REPLAY, (dlq_id,))


def dead_letter(db: Database, payload: bytes, offset: int, error: str = "poison") -> uuid.UUID:
    with connect(db.url, autocommit=True) as conn:
        store.dead_letter(conn, store.DeadLetter("ai-inference", "sensor-events", 0, offset, payload, error))
    return db.scalar('SELECT dlq_id FROM ai.dlq WHERE "offset" = %s', (offset,))  # type: ignore[no-any-return]


def entry(db: Database, dlq_id: uuid.UUID) -> tuple[Any, ...]:
    return db.rows("SELECT status, retry_count, error_message FROM ai.dlq WHERE dlq_id = %s", (dlq_id,))[0]


def settings(db_url: str, **env: str) -> Settings:
    # Nothing listens at the ingestion URL unless a test says so.
    return load_settings(
        {"CJ_AI_DATABASE_URL": db_url, "CJ_AI_INGEST_URL": f"http://127.0.0.1:{free_port()}", **env}
    )


Worker = Callable[..., tuple[ReplayWorker, Metrics]]


@pytest.fixture
def worker() -> Iterator[Worker]:
    """Makes in-process replay workers (`worker(settings, batch=10)`), closed at the test's end."""
    made: list[tuple[ReplayWorker, IngestClient]] = []

    def make(s: Settings, batch: int = 10) -> tuple[ReplayWorker, Metrics]:
        metrics = Metrics()
        ingest = IngestClient(s, metrics)
        made.append((ReplayWorker(s, metrics, ingest, batch=batch), ingest))
        return made[-1][0], metrics

    yield make
    for w, ingest in made:
        w.stop()
        ingest.close()


def replays(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("cj_ai_dlq_replays_total", {"outcome": outcome}) or 0.0


def scored(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("cj_ai_readings_scored_total") or 0.0


def now() -> datetime:
    return datetime.now(UTC) - timedelta(seconds=5)


def bus_reading(device: str, value: float, t: datetime) -> Reading:
    item = decode(json.dumps(reading(device, value, t)).encode(), None)
    assert isinstance(item, Reading)
    return item


def test_a_poison_entry_fails_again_then_replays_once_corrected(database: Database, worker: Worker) -> None:
    migrate(database.url)
    error = "sensor.reading payload.value must be a finite number"
    bad = reading("dev-q", "hot", now())
    dlq_id = dead_letter(database, json.dumps(bad).encode(), 0, "as first recorded")
    w, metrics = worker(settings(database.url))

    assert w.replay_batch() == []  # nothing requested yet
    assert request_replay(database, dlq_id) == 1
    assert request_replay(database, dlq_id) == 0  # already requested
    assert entry(database, dlq_id)[0] == "replaying"

    # Still poison: pending again, with the new error and one more retry.
    assert w.replay_batch() == [Replay(dlq_id, "failed", error)]
    assert entry(database, dlq_id) == ("pending", 1, error)
    assert database.count("ai.inference_results") == 0

    # The operator corrects the payload and asks again.
    execute(
        database,
        "UPDATE ai.dlq SET event_payload = jsonb_set(event_payload, '{payload,value}', '21.5') "
        "WHERE dlq_id = %s",
        (dlq_id,),
    )
    assert request_replay(database, dlq_id) == 1
    assert w.replay_batch() == [Replay(dlq_id, "replayed")]
    assert entry(database, dlq_id) == ("replayed", 1, error)
    result = database.rows("SELECT event_id::text, device_id, value, is_anomaly FROM ai.inference_results")
    assert result == [(bad["event_id"], "dev-q", 21.5, False)]
    assert database.scalar("SELECT readings FROM ai.device_models WHERE device_id = 'dev-q'") == 1
    assert [replays(metrics, o) for o in ("replayed", "failed", "deferred")] == [1, 1, 0]

    # A replayed entry cannot be requested again, so it is never learned twice.
    assert request_replay(database, dlq_id) == 0
    assert w.replay_batch() == []


def test_what_is_not_an_envelope_stays_pending(database: Database, worker: Worker) -> None:
    migrate(database.url)
    undecodable = dead_letter(database, b"\xff\xfe not json at all", 0)
    not_envelope = dead_letter(database, b'{"hello": "world"}', 1)
    for dlq_id in (undecodable, not_envelope):
        assert request_replay(database, dlq_id) == 1
    w, metrics = worker(settings(database.url))

    done = {r.dlq_id: r for r in w.replay_batch()}
    assert done[undecodable] == Replay(undecodable, "failed", NOT_JSON)
    assert entry(database, undecodable) == ("pending", 1, NOT_JSON)
    status, retries, error = entry(database, not_envelope)
    assert (status, retries) == ("pending", 1) and error.startswith("not an envelope: ")
    assert replays(metrics, "failed") == 2


def replayable(database: Database, n: int) -> list[uuid.UUID]:
    """`n` dead letters that replay successfully (readings of distinct devices), all requested."""
    ids = []
    for i in range(n):
        good = reading(f"dev-{i}", 20.0 + i, now())
        ids.append(dead_letter(database, json.dumps(good).encode(), i))
        assert request_replay(database, ids[-1]) == 1
    return ids


def test_two_workers_claiming_together_replay_a_row_once(
    database: Database, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(database.url)
    ids = replayable(database, 6)
    s = settings(database.url)
    (a, a_metrics), (b, b_metrics) = worker(s, batch=3), worker(s, batch=3)

    # Worker A claims three rows and is held in the middle of the first.
    entered, release = threading.Event(), threading.Event()
    replay_one = a._replay

    def held(dlq_id: uuid.UUID, payload: Any) -> str | None:
        entered.set()
        assert release.wait(20)
        return replay_one(dlq_id, payload)

    monkeypatch.setattr(a, "_replay", held)
    a_done: list[Replay] = []
    thread = threading.Thread(target=lambda: a_done.extend(a.replay_batch()))
    thread.start()
    try:
        assert entered.wait(20)
        # B skips A's claim: it gets the other three, and then nothing.
        b_done = b.replay_batch()
        assert b.replay_batch() == []
    finally:
        release.set()
        thread.join(20)

    assert len(a_done) == len(b_done) == 3
    assert {r.dlq_id for r in a_done}.isdisjoint(r.dlq_id for r in b_done)
    assert {r.dlq_id for r in a_done + b_done} == set(ids)
    assert {r.outcome for r in a_done + b_done} == {"replayed"}
    assert database.count("ai.dlq", "status = 'replayed' AND retry_count = 0") == 6
    assert database.count("ai.inference_results") == 6
    # Each row went through the handler once: a second pass would count as a redelivery.
    assert scored(a_metrics) == scored(b_metrics) == 3


def test_two_workers_racing_replay_each_row_once(database: Database, worker: Worker) -> None:
    migrate(database.url)
    ids = replayable(database, 30)
    s = settings(database.url)
    workers = [worker(s, batch=2), worker(s, batch=2)]
    done: list[list[Replay]] = [[], []]
    start = threading.Barrier(2)

    def drain(i: int) -> None:
        start.wait(10)
        while batch := workers[i][0].replay_batch():
            done[i].extend(batch)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    replayed = [r.dlq_id for r in done[0] + done[1]]
    assert sorted(replayed) == sorted(ids)  # every row, none twice
    assert sum(scored(m) for _, m in workers) == 30
    assert database.count("ai.dlq", "status = 'replayed'") == 30


def test_an_outage_leaves_the_request_in_place(
    database: Database, db_proxy: TcpProxy, worker: Worker
) -> None:
    migrate(database.url)
    [dlq_id] = replayable(database, 1)
    w, metrics = worker(settings(with_port(database.url, db_proxy.port)))

    db_proxy.cut()
    with pytest.raises(Outage):
        w.replay_batch()
    assert entry(database, dlq_id) == ("replaying", 0, "poison")

    db_proxy.restore()
    assert w.replay_batch() == [Replay(dlq_id, "replayed")]
    assert entry(database, dlq_id) == ("replayed", 0, "poison")


def test_an_unavailable_ingestion_api_leaves_the_request_in_place(database: Database, worker: Worker) -> None:
    migrate(database.url)
    s = settings(database.url, CJ_AI_WARMUP="5")
    t0 = now() - timedelta(seconds=30)
    params = ModelParams(s.threshold, s.warmup, s.horizon)
    with connect(database.url, autocommit=True) as conn:
        for i, v in enumerate([20.0, 20.2, 19.8, 20.1, 19.9, 20.0]):
            store.score_and_store(conn, bus_reading("dev-o", v, t0 + timedelta(seconds=i)), params)
    outlier = reading("dev-o", 90.0, now())
    dlq_id = dead_letter(database, json.dumps(outlier).encode(), 0)
    assert request_replay(database, dlq_id) == 1
    w, metrics = worker(s)  # its ingestion URL answers nothing

    with pytest.raises(Outage, match="ingestion API unavailable"):
        w.replay_batch()
    assert entry(database, dlq_id) == ("replaying", 0, "poison")
    assert replays(metrics, "deferred") == 1
    # Scored and stored meanwhile; the next round answers from the stored result.
    assert database.count("ai.inference_results", "is_anomaly") == 1


def test_the_sidecar_replays_a_refused_anomaly_once_corrected(
    database: Database, bus: Bus, ingestion: Ingestion, sidecars: Sidecars
) -> None:
    ai = sidecars.start(CJ_AI_INGEST_URL=ingestion.url, CJ_AI_WARMUP="5", CJ_AI_DLQ_REPLAY_INTERVAL_MS="100")
    t0 = now() - timedelta(seconds=30)
    for i, v in enumerate([20.0, 20.2, 19.8, 20.1, 19.9, 20.0, 20.1]):
        bus.publish(reading("dev-r", v, t0 + timedelta(seconds=i)), key="dev-r")
    # The API refuses event times more than 5 minutes ahead; the anomaly carries the source's.
    future = reading("dev-r", 90.0, datetime.now(UTC) + timedelta(hours=1))
    bus.publish(future, key="dev-r")
    dlq_id = wait_for(lambda: database.scalar("SELECT dlq_id FROM ai.dlq"), 30, "the dead letter")

    # Refused again: pending, with the API's answer and one more retry.
    assert request_replay(database, dlq_id) == 1
    wait_for(lambda: entry(database, dlq_id)[0] == "pending", 15, "the replay to fail")
    status, retries, error = entry(database, dlq_id)
    assert retries == 1 and "400" in error and "event_time" in error
    assert ai.metric("cj_ai_dlq_replays_total", outcome="failed") == 1

    # Corrected, it is replayed and the ai.anomaly event reaches the event store, once.
    corrected = json.dumps(reading("dev-r", 90.0, t0 + timedelta(seconds=8))["event_time"])
    execute(
        database,
        "UPDATE ai.dlq SET event_payload = jsonb_set(event_payload, '{event_time}', %s::jsonb) "
        "WHERE dlq_id = %s",
        (corrected, dlq_id),
    )
    assert request_replay(database, dlq_id) == 1
    wait_for(lambda: entry(database, dlq_id)[0] == "replayed", 15, "the replay")
    assert entry(database, dlq_id)[1] == 1
    stored = wait_for(
        lambda: database.rows("SELECT payload FROM ingestion.event_store WHERE event_type = 'ai.anomaly'"),
        30,
        "the ai.anomaly event",
    )
    assert len(stored) == 1 and stored[0][0]["source_event_id"] == future["event_id"]
    assert ai.metric("cj_ai_dlq_replays_total", outcome="replayed") == 1
    # The reading was scored when it arrived; the replay answered from that result.
    assert database.count("ai.inference_results", "is_anomaly") == 1
    assert ai.get("/model").json()["devices"] == {"dev-r": 8}
    assert ai.stop() == 0
