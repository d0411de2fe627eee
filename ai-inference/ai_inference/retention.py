"""Retention of inference results (SPEC §13): results older than the time-series window
(`CJ_RETENTION_TIMESERIES`, like the platform's sensor readings) are deleted every
`CJ_RETENTION_INTERVAL`, in slices, so a large backlog never holds one long transaction.
Per-device model state (`ai.device_models`) is kept: it is the model, not history.
"""

from __future__ import annotations

import logging
import threading

import psycopg

from ai_inference.db import connect

log = logging.getLogger(__name__)

SLICE = 10_000


def purge(url: str, keep_ms: int, slice_rows: int = SLICE) -> int:
    """Deletes results older than `keep_ms`; returns how many went."""
    removed = 0
    with connect(url, autocommit=True) as conn:
        while True:
            cur = conn.execute(
                """DELETE FROM ai.inference_results
                   WHERE time < now() - make_interval(secs => %(keep)s)
                     AND ctid = ANY (ARRAY(
                         SELECT ctid FROM ai.inference_results
                         WHERE time < now() - make_interval(secs => %(keep)s)
                         LIMIT %(n)s))""",
                {"keep": keep_ms / 1000.0, "n": slice_rows},
            )
            removed += cur.rowcount
            if cur.rowcount < slice_rows:
                return removed


class RetentionJob:
    """Runs `purge` at startup and then every interval, on a thread of its own, until stopped."""

    def __init__(self, url: str, keep_ms: int, interval_ms: int) -> None:
        self._url, self._keep_ms, self._interval_s = url, keep_ms, interval_ms / 1000.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = purge(self._url, self._keep_ms)
                if n:
                    log.info("Retention: old inference results removed.", extra={"removed": n})
            except psycopg.Error as e:
                log.warning("Retention failed; the next run retries.", extra={"error": str(e)})
            self._stop.wait(self._interval_s)
