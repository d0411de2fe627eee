"""Replays of `ai.dlq`: the sidecar's half of `cornjacket dlq replay`.

The platform replays its own dead letters in-process, but the model runs only here, so for the
sidecar a replay is a request, answered asynchronously. The CLI marks a pending row:

    UPDATE ai.dlq SET status = 'replaying', updated_at = now() WHERE dlq_id = $1 AND status = 'pending'

and the worker of any sidecar instance claims requested rows a few at a time (`FOR UPDATE SKIP
LOCKED`, held while they are processed, so two instances never replay one row twice), processes
each row's `event_payload` with the consumer's own handler, exactly as the same message from the
bus, and sets `replayed`, or `pending` again with the new error and `retry_count + 1`. An outage
of the database or the ingestion API leaves the row `replaying` for a later round: a request is
never lost, and never marked failed because of an outage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

import psycopg

from ai_inference import store
from ai_inference.config import Settings
from ai_inference.db import OUTAGE_ERRORS, connect
from ai_inference.handler import Handler, Refused
from ai_inference.ingest import Disposition, IngestClient, Submission
from ai_inference.metrics import Metrics
from ai_inference.model import ModelParams

log = logging.getLogger(__name__)

T = TypeVar("T")

BATCH = 10
MAX_BACKOFF_S = 10.0
# While an outage lasts, repeat the warning this often rather than at every round.
REPEAT_WARNING_S = 30.0
# The platform's wording for a dead letter that was never JSON (its raw_payload is kept instead).
NOT_JSON = "the payload is not JSON; correct event_payload before replaying"

_CLAIM = """
    SELECT dlq_id, event_payload FROM ai.dlq
     WHERE status = 'replaying'
     ORDER BY updated_at, dlq_id
     LIMIT %s
       FOR UPDATE SKIP LOCKED"""
_REPLAYED = """
    UPDATE ai.dlq SET status = 'replayed', updated_at = now()
     WHERE dlq_id = %s AND status = 'replaying'"""
_FAILED = """
    UPDATE ai.dlq SET status = 'pending', error_message = %s, retry_count = retry_count + 1,
                      updated_at = now()
     WHERE dlq_id = %s AND status = 'replaying'"""


class Outage(Exception):
    """The database or the ingestion API is unavailable: the row waits for a later round."""


@dataclass(frozen=True)
class Replay:
    dlq_id: UUID
    outcome: str  # "replayed" or "failed"
    error: str | None = None


class ReplayWorker:
    """Polls for requested replays every `CJ_AI_DLQ_REPLAY_INTERVAL_MS` on a thread of its own."""

    def __init__(
        self, settings: Settings, metrics: Metrics, ingest: IngestClient, batch: int = BATCH
    ) -> None:
        self._url = settings.database_url
        self._interval_s = settings.dlq_replay_interval_ms / 1000.0
        self._metrics = metrics
        self._ingest = ingest
        self._batch = batch
        params = ModelParams(settings.threshold, settings.warmup, settings.horizon)
        self._handler = Handler(params, metrics, self._with_db, self._submit)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dlq-replay", daemon=True)
        # Two connections: the claim's transaction holds the row locks while the handler commits
        # its results on its own, as it does for the consumer.
        self._claims: psycopg.Connection | None = None
        self._db: psycopg.Connection | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 20.0) -> None:
        self._stop.set()
        if self._thread.ident is None:
            # Never started: release what direct calls of replay_batch opened.
            self._drop_connections()
            return
        # Every step is bounded (connect and TCP timeouts, the HTTP timeout): one row at most.
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("The DLQ replay worker did not stop in time.", extra={"timeout_s": timeout_s})

    def _run(self) -> None:
        delay, last_warning = self._interval_s, None
        try:
            while not self._stop.is_set():
                try:
                    done = self.replay_batch()
                except Outage as e:
                    now = time.monotonic()
                    if last_warning is None or now - last_warning >= REPEAT_WARNING_S:
                        log.warning(
                            "DLQ replays deferred; retrying.", extra={"reason": str(e), "retry_in_s": delay}
                        )
                        last_warning = now
                    self._stop.wait(delay)
                    delay = min(delay * 2, max(MAX_BACKOFF_S, self._interval_s))
                    continue
                except Exception:
                    # A bug, not the data (the handler's refusals are answered per row): keep the
                    # consumer running and try again later.
                    log.exception("DLQ replay round failed.")
                    self._drop_connections()
                    self._stop.wait(MAX_BACKOFF_S)
                    continue
                if last_warning is not None:
                    log.info("DLQ replays resuming.")
                    last_warning = None
                delay = self._interval_s
                # A full batch means more may be waiting: go on at once.
                if len(done) < self._batch:
                    self._stop.wait(self._interval_s)
        finally:
            self._drop_connections()

    # --- one round ---------------------------------------------------------------------------

    def replay_batch(self) -> list[Replay]:
        """Claims up to `batch` requested rows and replays them; returns what was settled.

        Raises `Outage` when the database or the ingestion API is unavailable, after settling
        the rows replayed before it (when the database still answers); the others stay
        `replaying`. Stops between rows when the worker is stopped.
        """
        done: list[Replay] = []
        outage: Outage | None = None
        try:
            if self._claims is None or self._claims.closed:
                self._claims = connect(self._url, autocommit=True)
            conn = self._claims
            with conn.transaction():
                for dlq_id, payload in conn.execute(_CLAIM, (self._batch,)).fetchall():
                    if self._stop.is_set():
                        break
                    try:
                        error = self._replay(dlq_id, payload)
                    except Outage as e:
                        outage = e
                        self._metrics.dlq_replays.labels(outcome="deferred").inc()
                        break
                    if error is None:
                        conn.execute(_REPLAYED, (dlq_id,))
                        done.append(Replay(dlq_id, "replayed"))
                    else:
                        conn.execute(_FAILED, (error, dlq_id))
                        done.append(Replay(dlq_id, "failed", error))
        except OUTAGE_ERRORS as e:
            # Nothing of this round was settled: every claimed row is still `replaying`.
            self._drop(self._claims)
            self._claims = None
            raise Outage(f"database unavailable: {e}".strip()) from e
        except psycopg.Error as e:
            # A schema or permission problem: not the rows' fault.
            raise Outage(f"database error: {type(e).__name__}: {e}".strip()) from e
        for r in done:
            self._metrics.dlq_replays.labels(outcome=r.outcome).inc()
            if r.outcome == "replayed":
                log.info("Dead letter replayed.", extra={"dlq_id": str(r.dlq_id)})
            else:
                log.warning("Dead letter replay failed.", extra={"dlq_id": str(r.dlq_id), "error": r.error})
        if outage is not None:
            raise outage
        return done

    def _replay(self, dlq_id: UUID, payload: Any) -> str | None:
        """Processes one row's payload; None on success, else the error that keeps it pending."""
        if payload is None:
            return NOT_JSON
        try:
            # As the bus would deliver it; the bus headers are not kept, metadata.traceparent is.
            self._handler.handle(json.dumps(payload).encode(), None)
        except Refused as e:
            return e.error
        except (Outage, psycopg.Error):
            raise
        except Exception as e:
            # A bug in the handler: recorded on the row, which waits for an operator like any
            # other failure, instead of failing every round.
            log.exception("Dead letter replay crashed.", extra={"dlq_id": str(dlq_id)})
            return f"replay failed: {type(e).__name__}: {e}"
        return None

    # --- the handler's outage policy: give up at once, the row waits -------------------------

    def _with_db(self, fn: Callable[[psycopg.Connection], T]) -> T:
        try:
            if self._db is None or self._db.closed:
                self._db = connect(self._url, autocommit=True)
            return fn(self._db)
        except OUTAGE_ERRORS as e:
            self._drop(self._db)
            self._db = None
            raise Outage(f"database unavailable: {e}".strip()) from e
        except psycopg.DataError:
            raise
        except psycopg.Error as e:
            raise Outage(f"database error: {type(e).__name__}: {e}".strip()) from e

    def _submit(self, result: store.Result) -> Submission:
        sub = self._ingest.submit(result)
        if sub.disposition in (Disposition.ACCEPTED, Disposition.REJECTED):
            return sub
        if sub.disposition is Disposition.MISCONFIGURED:
            raise Outage(f"the ingestion API refused the request ({sub.status}): check the configuration")
        raise Outage(f"ingestion API unavailable ({sub.status or sub.detail})")

    @staticmethod
    def _drop(conn: psycopg.Connection | None) -> None:
        if conn is not None:
            # Closing a broken connection may fail too.
            with contextlib.suppress(Exception):
                conn.close()

    def _drop_connections(self) -> None:
        self._drop(self._claims)
        self._drop(self._db)
        self._claims = self._db = None
