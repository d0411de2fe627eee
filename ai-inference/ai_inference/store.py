"""The sidecar's tables: inference results, per-(device, key) model state and dead letters."""

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
    """The score of one quantity (`key`) of a reading."""

    reading: Reading
    key: str
    value: float
    score: float
    is_anomaly: bool
    model: str
    model_version: str
    new: bool  # False when the quantity had been scored before (a redelivery)


_LOAD_STATE = """
    SELECT readings, n, mean, variance FROM ai.device_models
     WHERE device_id = %s AND key = %s AND model = %s AND model_version = %s"""


def _state(row: tuple[Any, ...] | None) -> DeviceState | None:
    return DeviceState(int(row[0]), float(row[1]), float(row[2]), float(row[3])) if row else None


def _stored(conn: psycopg.Connection, reading: Reading) -> dict[str, Result]:
    """The results stored for the reading before, by the key of the quantity they score.

    A legacy reading is one quantity, so any row of its event is that quantity's result: rows
    stored before migration V4 have the key 'value' even when the payload named a `metric`, and
    answering the reading with them (under their key, hence their anomaly's original id) keeps a
    redelivery across the upgrade from learning the reading twice.
    """
    rows = conn.execute(
        """SELECT key, value, score, is_anomaly, model, model_version FROM ai.inference_results
            WHERE event_id = %s ORDER BY key""",
        (reading.event_id,),
    ).fetchall()
    found = {
        r[0]: Result(reading, r[0], float(r[1]), float(r[2]), bool(r[3]), r[4], r[5], new=False) for r in rows
    }
    if reading.legacy and found and reading.quantities[0].key not in found:
        return {reading.quantities[0].key: next(iter(found.values()))}
    return found


def score_and_store(conn: psycopg.Connection, reading: Reading, params: ModelParams) -> list[Result]:
    """Scores each quantity of the reading, then learns it, in one transaction with the results.

    Every key has a model of its own, so an outlier of one quantity never disturbs another's. A
    quantity already scored is answered from its stored row and not learned again, so redelivery
    changes nothing; the per-device transaction lock keeps two instances that briefly share a
    partition during a rebalance from interleaving on one device (any of its keys).
    """
    results: list[Result] = []
    with conn.transaction():
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('ai.device:' || %s, 0))",
            (reading.device_id,),
        )
        stored = _stored(conn, reading)
        for q in reading.quantities:
            if q.key in stored:
                results.append(stored[q.key])
                continue
            state = _state(
                conn.execute(_LOAD_STATE, (reading.device_id, q.key, MODEL_NAME, MODEL_VERSION)).fetchone()
            )
            model = DeviceModel(params, state)
            verdict = model.score(q.value)
            model.learn(q.value)
            s = model.state()
            conn.execute(
                """INSERT INTO ai.inference_results
                       (event_id, key, device_id, time, value, score, is_anomaly, model, model_version)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (event_id, key) DO NOTHING""",
                (
                    reading.event_id,
                    q.key,
                    reading.device_id,
                    reading.event_time,
                    q.value,
                    verdict.score,
                    verdict.is_anomaly,
                    MODEL_NAME,
                    MODEL_VERSION,
                ),
            )
            conn.execute(
                """INSERT INTO ai.device_models
                       (device_id, key, model, model_version, readings, n, mean, variance, updated_at)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now())
                   ON CONFLICT (device_id, key) DO UPDATE SET
                       model = EXCLUDED.model, model_version = EXCLUDED.model_version,
                       readings = EXCLUDED.readings, n = EXCLUDED.n, mean = EXCLUDED.mean,
                       variance = EXCLUDED.variance, updated_at = now()""",
                (reading.device_id, q.key, MODEL_NAME, MODEL_VERSION, s.readings, s.n, s.mean, s.variance),
            )
            results.append(
                Result(
                    reading,
                    q.key,
                    q.value,
                    verdict.score,
                    verdict.is_anomaly,
                    MODEL_NAME,
                    MODEL_VERSION,
                    new=True,
                )
            )
    return results


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


async def load_state(conn: psycopg.AsyncConnection, device_id: str, key: str) -> DeviceState | None:
    cur = await conn.execute(_LOAD_STATE, (device_id, key, MODEL_NAME, MODEL_VERSION))
    return _state(await cur.fetchone())


async def infer(
    conn: psycopg.AsyncConnection, device_id: str, key: str, value: float, params: ModelParams
) -> Verdict:
    """Scores a value against the stored model of the device's quantity `key`, without learning it."""
    return DeviceModel(params, await load_state(conn, device_id, key)).score(value)


@dataclass(frozen=True)
class ModelCounts:
    """Readings learned by the stored models, for the first devices by id."""

    devices: dict[str, int]  # per device, summed over its keys
    keys: dict[str, dict[str, int]]  # per device and key (the first keys by name)
    device_count: int
    model_count: int  # (device, key) states in all
    keys_truncated: bool  # some device has more keys than listed


async def model_counts(conn: psycopg.AsyncConnection, device_limit: int, key_limit: int) -> ModelCounts:
    """Bounded however many devices and keys there are: `device_limit` devices, each with up to
    `key_limit` keys listed (its sum still counts them all)."""
    cur = await conn.execute(
        """WITH d AS (
               SELECT device_id, sum(readings) AS readings, count(*) AS keys,
                      count(*) OVER () AS devices, sum(count(*)) OVER () AS models
                 FROM ai.device_models
                WHERE model = %(model)s AND model_version = %(version)s
                GROUP BY device_id ORDER BY device_id LIMIT %(devices)s)
           SELECT d.device_id, d.readings, d.keys, d.devices, d.models, k.key, k.readings
             FROM d CROSS JOIN LATERAL (
                  SELECT key, readings FROM ai.device_models m
                   WHERE m.device_id = d.device_id AND m.model = %(model)s
                     AND m.model_version = %(version)s
                   ORDER BY key LIMIT %(keys)s) k
            ORDER BY d.device_id, k.key""",
        {"model": MODEL_NAME, "version": MODEL_VERSION, "devices": device_limit, "keys": key_limit},
    )
    rows = await cur.fetchall()
    devices: dict[str, int] = {}
    keys: dict[str, dict[str, int]] = {}
    truncated = False
    for device, total, n_keys, _, _, key, readings in rows:
        devices[device] = int(total)
        keys.setdefault(device, {})[key] = int(readings)
        truncated = truncated or int(n_keys) > key_limit
    return ModelCounts(
        devices=devices,
        keys=keys,
        device_count=int(rows[0][3]) if rows else 0,
        model_count=int(rows[0][4]) if rows else 0,
        keys_truncated=truncated,
    )
