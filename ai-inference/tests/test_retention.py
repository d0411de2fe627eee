"""Retention of inference results against the real database."""

from __future__ import annotations

import uuid

import psycopg

from ai_inference.db import migrate
from ai_inference.retention import purge
from conftest import Database


def insert(db: Database, device: str, age: str) -> None:
    with psycopg.connect(db.url, autocommit=True) as conn:
        conn.execute(
            f"""INSERT INTO ai.inference_results
                (event_id, device_id, time, value, score, is_anomaly, model, model_version)
            VALUES (%s, %s, now() - interval '{age}', 1.0, 0.1, false, 'm', '1')""".encode(),
            (uuid.uuid4(), device),
        )


def test_results_older_than_the_window_go_newer_ones_stay(database: Database) -> None:
    migrate(database.url)
    for _ in range(5):
        insert(database, "old", "10 days")
    insert(database, "new", "1 day")
    insert(database, "now", "0 seconds")
    # Slices of 2: several statements, none of them over the limit.
    assert purge(database.url, keep_ms=7 * 86_400_000, slice_rows=2) == 5
    devices = sorted(r[0] for r in database.rows("SELECT device_id FROM ai.inference_results"))
    assert devices == ["new", "now"]
    assert purge(database.url, keep_ms=7 * 86_400_000) == 0
