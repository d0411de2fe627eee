"""What one `sensor-events` message causes: decode, score and store, report an anomaly.

Shared by the bus consumer and the DLQ replay worker, so a replayed dead letter is processed
exactly as the same message from the bus. Outages are not handled here but by the caller's
`with_db` and `submit`: the consumer blocks in them until the outage ends, the replay worker gives
up and leaves the dead letter for a later round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

import psycopg

from ai_inference import store
from ai_inference.envelope import Headers, Poison, Reading, Skip, decode
from ai_inference.ingest import Disposition, Submission
from ai_inference.metrics import Metrics
from ai_inference.model import ModelParams

log = logging.getLogger(__name__)

T = TypeVar("T")


class DbRunner(Protocol):
    def __call__(self, fn: Callable[[psycopg.Connection], T]) -> T: ...


class Refused(Exception):
    """The message can never be processed as it is: it belongs in the DLQ."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(error)
        self.error = error
        self.reason = reason  # the `reason` label of cj_ai_dlq_total


class Handler:
    def __init__(
        self,
        params: ModelParams,
        metrics: Metrics,
        with_db: DbRunner,
        submit: Callable[[store.Result], Submission],
    ) -> None:
        self._params = params
        self._metrics = metrics
        self._with_db = with_db
        self._submit = submit

    def handle(self, value: bytes | None, headers: Headers) -> str:
        """Processes one message; returns `scored`, `redelivered` or `skipped`, raises `Refused`.

        Each quantity of a reading is scored, and each anomalous one reported as an `ai.anomaly`
        of its own. Idempotent: a message handled before is answered from its stored results,
        and their anomalies are submitted again under the same event ids, which the API accepts
        without storing twice. `scored` when any quantity was new.
        """
        try:
            item = decode(value, headers)
        except Poison as e:
            raise Refused(str(e), "poison") from None
        if isinstance(item, Skip):
            return "skipped"
        try:
            results = self._with_db(lambda db: store.score_and_store(db, item, self._params))
        except psycopg.DataError as e:
            raise Refused(f"the reading cannot be stored: {e}", "unstorable") from None
        for result in results:
            if result.new:
                self._metrics.scored.inc()
                if result.is_anomaly:
                    self._metrics.anomalies.inc()
        for result in results:
            if not result.is_anomaly:
                continue
            self._log_anomaly(item, result)
            sub = self._submit(result)
            if sub.disposition is Disposition.REJECTED:
                # The whole message is dead-lettered; a replay resubmits the anomalies already
                # accepted under their ids, which the API answers without storing them twice.
                raise Refused(
                    f"the ingestion API refused the ai.anomaly event ({sub.status}): {sub.detail}",
                    "ingest_rejected",
                )
        return "scored" if any(r.new for r in results) else "redelivered"

    def _log_anomaly(self, r: Reading, result: store.Result) -> None:
        log.info(
            "Anomaly.",
            extra={
                "event_id": str(r.event_id),
                "device_id": r.device_id,
                "key": result.key,
                "value": result.value,
                "score": round(result.score, 3),
                "threshold": self._params.threshold,
                "redelivered": not result.new,
            },
        )
