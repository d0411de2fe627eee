"""Submitting `ai.anomaly` events through the platform's ingestion API (SPEC §5, §9)."""

from __future__ import annotations

import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from ai_inference.config import SERVICE_NAME, Settings
from ai_inference.ids import anomaly_event_id
from ai_inference.metrics import Metrics
from ai_inference.model import MODEL_NAME, MODEL_VERSION
from ai_inference.store import Result

ANOMALY_EVENT_TYPE = "ai.anomaly"
# `ingest:write` passes the ingest route; `ingest:ai` lets it submit ai.* events.
INGEST_SCOPE = "ingest:write ingest:ai"
# Self-minted tokens live this long and are renewed when less than a tenth of that is left.
TOKEN_TTL_S = 3600


class Disposition(enum.Enum):
    ACCEPTED = "accepted"  # 202: stored, or already stored under this event_id
    REJECTED = "rejected"  # 400: the API will never take this event → dead letter
    MISCONFIGURED = "misconfigured"  # 401/403/404…: our configuration is wrong → block loudly
    RETRY = "retry"  # 429/503/5xx/connection: try again later → block


@dataclass(frozen=True)
class Submission:
    disposition: Disposition
    status: int | None
    detail: str
    retry_after_s: float | None = None


class TokenSource:
    """The bearer token: the configured one, else one minted from CJ_JWT_SECRET, else none."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self._static = settings.ingest_token.get_secret_value() if settings.ingest_token else None
        self._secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._clock = clock
        self._minted: str | None = None
        self._expires = 0.0

    @property
    def kind(self) -> str:
        return "configured" if self._static else "minted" if self._secret else "none"

    def token(self) -> str | None:
        if self._static or not self._secret:
            return self._static
        now = self._clock()
        if self._minted is None or now > self._expires - TOKEN_TTL_S / 10:
            self._minted = self.mint(int(now))
            self._expires = now + TOKEN_TTL_S
        return self._minted

    def mint(self, now: int) -> str:
        assert self._secret is not None
        claims: dict[str, Any] = {
            "sub": SERVICE_NAME,
            "scope": INGEST_SCOPE,
            "iat": now,
            "exp": now + TOKEN_TTL_S,
        }
        if self._issuer:
            claims["iss"] = self._issuer
        if self._audience:
            claims["aud"] = self._audience
        return jwt.encode(claims, self._secret, algorithm="HS256")


def anomaly_request(result: Result, threshold: float) -> dict[str, Any]:
    """The `ai.anomaly` event for one anomalous quantity; `key` says which of the reading's."""
    r = result.reading
    return {
        "event_type": ANOMALY_EVENT_TYPE,
        "aggregate_id": r.device_id,
        "event_id": str(anomaly_event_id(r.event_id, r.event_time, result.key)),
        "event_time": r.event_time_text,
        "payload": {
            "source_event_id": str(r.event_id),
            "device_id": r.device_id,
            "key": result.key,
            "value": result.value,
            "score": result.score,
            "threshold": threshold,
            "model": f"{MODEL_NAME}@{MODEL_VERSION}",
        },
    }


def classify(status: int) -> Disposition:
    if status in (200, 201, 202):
        return Disposition.ACCEPTED
    if status in (400, 422):
        return Disposition.REJECTED
    if status in (408, 425, 429) or status >= 500:
        return Disposition.RETRY
    return Disposition.MISCONFIGURED


class IngestClient:
    def __init__(self, settings: Settings, metrics: Metrics, tokens: TokenSource | None = None) -> None:
        self._http = httpx.Client(base_url=settings.ingest_url, timeout=httpx.Timeout(5.0))
        self._tokens = tokens or TokenSource(settings)
        self._threshold = settings.threshold
        self._metrics = metrics

    def submit(self, result: Result) -> Submission:
        """One attempt at submitting the anomaly for `result`; the caller decides what follows."""
        headers = {"content-type": "application/json"}
        token = self._tokens.token()
        if token:
            headers["authorization"] = f"Bearer {token}"
        if result.reading.traceparent:
            headers["traceparent"] = result.reading.traceparent
        try:
            resp = self._http.post(
                "/api/v1/ingest", json=anomaly_request(result, self._threshold), headers=headers
            )
        except httpx.HTTPError as e:
            self._metrics.ingest.labels(status="error").inc()
            return Submission(Disposition.RETRY, None, f"{type(e).__name__}: {e}")
        self._metrics.ingest.labels(status=str(resp.status_code)).inc()
        disposition = classify(resp.status_code)
        retry_after: float | None = None
        with contextlib.suppress(KeyError, ValueError):
            retry_after = float(resp.headers["retry-after"])
        return Submission(disposition, resp.status_code, resp.text[:2000], retry_after)

    def close(self) -> None:
        self._http.close()
