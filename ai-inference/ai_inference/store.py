"""The sidecar's tables: inference results, per-device model state and dead letters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from ai_inference.envelope import Reading, loads_strict
from ai_inference.ids import uuid7
from ai_inference.model import MODEL_NAME, MODEL_VERSION, DeviceModel, DeviceState, ModelParams, Verdict


@dataclass(frozen=True)
class Result:
    reading: Reading
    score: float
    is_anomaly: bool
    model: str
    model_version: str
    new: bool  # False when the reading had been scored before (a redelivery)


_LOAD_STATE = """
    SELECT readings, n, mean, variance FROM ai.device_models
     WHERE device_id = %s AND model = %s AND model_version = %s"""


def _state(row: tuple[Any, ...] | None) -> DeviceState | None:
    return DeviceState(int(row[0]), float(row[1]), float(row[2]), float(row[3])) if row else None


def score_and_store(conn: psycopg.Connection, reading: Reading, params: ModelParams) -> Result:
    """Scores the reading, then learns it, in one transaction with the stored result.

    A reading already scored is answered from its stored row and not learned again, so
    redelivery changes nothing; the per-device transaction lock keeps two instances that briefly
    share a partition during a rebalance from interleaving on one device.
    """
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('ai.device:' || %s, 0))",
            (reading.device_id,),
        )
        row = conn.execute(
            "SELECT score, is_anomaly, model, model_version FROM ai.inference_results WHERE event_id = %s",
            (reading.event_id,),
        ).fetchone()
        if row:
            return Result(reading, float(row[0]), bool(row[1]), row[2], row[3], new=False)

        state = _state(conn.execute(_LOAD_STATE, (reading.device_id, MODEL_NAME, MODEL_VERSION)).fetchone())
        model = DeviceModel(params, state)
        verdict = model.score(reading.value)
        model.learn(reading.value)
        s = model.state()
        conn.execute(
            """INSERT INTO ai.inference_results
                   (event_id, device_id, time, value, score, is_anomaly, model, model_version)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (event_id) DO NOTHING""",
            (
                reading.event_id,
                reading.device_id,
                reading.event_time,
                reading.value,
                verdict.score,
                verdict.is_anomaly,
                MODEL_NAME,
                MODEL_VERSION,
            ),
        )
        conn.execute(
            """INSERT INTO ai.device_models
                   (device_id, model, model_version, readings, n, mean, variance, updated_at)
               VALUES (%s, %s, %s, %s, %s, %s, %s, now())
               ON CONFLICT (device_id) DO UPDATE SET
                   model = EXCLUDED.model, model_version = EXCLUDED.model_version,
                   readings = EXCLUDED.readings, n = EXCLUDED.n, mean = EXCLUDED.mean,
                   variance = EXCLUDED.variance, updated_at = now()""",
            (reading.device_id, MODEL_NAME, MODEL_VERSION, s.readings, s.n, s.mean, s.variance),
        )
    return Result(reading, verdict.score, verdict.is_anomaly, MODEL_NAME, MODEL_VERSION, new=True)


@dataclass(frozen=True)
class DeadLetter:
    consumer: str
    topic: str
    partition: int
    offset: int
    payload: bytes | None
    error: str
    retries: int = 0


def dead_letter(conn: psycopg.Connection, d: DeadLetter) -> None:
    """Records a dead letter, once per source position."""
    raw = d.payload or b""
    text = raw.decode("utf-8", errors="replace")
    doc: Any = None
    # PostgreSQL refuses NUL in text and jsonb: such a payload is kept as escaped text, so that
    # recording a dead letter can never fail on its content.
    if "\x00" not in text and "\\u0000" not in text:
        try:
            doc = loads_strict(raw)
        except (ValueError, RecursionError):
            doc = None
    fields = doc if isinstance(doc, dict) else {}

    def field(k: str) -> str | None:
        v = fields.get(k)
        return v if isinstance(v, str) and "\x00" not in v else None

    event_id: UUID | None
    try:
        event_id = UUID(field("event_id") or "")
    except ValueError:
        event_id = None
    with conn.transaction():
        conn.execute(
            """INSERT INTO ai.dlq
                   (dlq_id, consumer, event_id, event_type, aggregate_id, event_payload, raw_payload,
                    error_message, retry_count, topic, "partition", "offset")
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (consumer, topic, "partition", "offset") DO NOTHING""",
            (
                uuid7(),
                d.consumer,
                event_id,
                field("event_type"),
                field("aggregate_id"),
                Jsonb(doc) if doc is not None else None,
                None if doc is not None else text.replace("\x00", "\\0"),
                d.error,
                d.retries,
                d.topic,
                d.partition,
                d.offset,
            ),
        )


# --- read side, for the HTTP API -------------------------------------------------------------


async def load_state(conn: psycopg.AsyncConnection, device_id: str) -> DeviceState | None:
    cur = await conn.execute(_LOAD_STATE, (device_id, MODEL_NAME, MODEL_VERSION))
    return _state(await cur.fetchone())


async def infer(conn: psycopg.AsyncConnection, device_id: str, value: float, params: ModelParams) -> Verdict:
    """Scores a value against the device's stored model without learning it."""
    return DeviceModel(params, await load_state(conn, device_id)).score(value)


async def device_counts(conn: psycopg.AsyncConnection, limit: int) -> tuple[dict[str, int], int]:
    """Readings learned per device (the first `limit` by id) and the number of devices."""
    cur = await conn.execute(
        """SELECT device_id, readings, count(*) OVER () FROM ai.device_models
            WHERE model = %s AND model_version = %s ORDER BY device_id LIMIT %s""",
        (MODEL_NAME, MODEL_VERSION, limit),
    )
    rows = await cur.fetchall()
    return {r[0]: int(r[1]) for r in rows}, (int(rows[0][2]) if rows else 0)
