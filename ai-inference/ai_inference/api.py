"""HTTP: `/livez`, `/readyz` (= `/health`), `/infer`, `/model`, `/metrics` (SPEC §2, §9, §13)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ai_inference import store
from ai_inference.config import Settings
from ai_inference.db import aconnect
from ai_inference.envelope import DEFAULT_KEY, KEY_RULE, is_key
from ai_inference.metrics import Metrics
from ai_inference.model import LIBRARY, MODEL_NAME, MODEL_VERSION, ModelParams
from ai_inference.state import ServiceState

log = logging.getLogger(__name__)

T = TypeVar("T")

HEALTH_DB_TIMEOUT_S = 1.0
QUERY_TIMEOUT_S = 3.0
MODEL_DEVICE_LIMIT = 1000
# Keys listed per device by /model: a device's keys are whatever its readings named, unbounded.
MODEL_KEY_LIMIT = 100

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"
_RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}


class AsyncDb:
    """One lazily (re)opened connection for the HTTP side, separate from the consumer's, so a
    blocked consumer never delays a health probe and a broken connection is replaced."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()

    async def run(self, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]], timeout_s: float) -> T:
        async def attempt() -> T:
            async with self._lock:
                try:
                    if self._conn is None or self._conn.closed:
                        self._conn = await aconnect(self._url)
                    return await fn(self._conn)
                except BaseException:
                    # Whatever the connection's state after an error or a timeout, start afresh.
                    await self.close()
                    raise

        return await asyncio.wait_for(attempt(), timeout_s)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Closing a broken connection may fail too.
            with contextlib.suppress(Exception):
                await conn.close()


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: Annotated[str, Field(min_length=1, max_length=256)]
    # Which of the device's quantities: its model is the one scored. The default is the key of a
    # legacy reading without `metric`, so requests from before keys existed mean what they did.
    key: str = DEFAULT_KEY
    # Strict: a JSON number only (no "12.5" strings, no booleans), and finite.
    value: Annotated[float, Field(strict=True, allow_inf_nan=False)]

    @field_validator("device_id")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("must contain printable characters only")
        return v

    @field_validator("key", mode="before")
    @classmethod
    def _key(cls, v: object) -> object:
        # The rule of sensor.reading keys, so every key that can have a model can be asked for.
        if not is_key(v):
            raise ValueError(f"must be {KEY_RULE}")
        return v


def _worst(*statuses: str) -> str:
    return max(statuses, key=_RANK.__getitem__)


def _error(status: int, error: str, details: list[Any] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "details": details or []}, status_code=status)


def create_app(
    settings: Settings,
    state: ServiceState,
    metrics: Metrics,
    on_startup: Callable[[], None] = lambda: None,
    on_shutdown: Callable[[], None] = lambda: None,
) -> FastAPI:
    params = ModelParams(settings.threshold, settings.warmup, settings.horizon)
    db = AsyncDb(settings.database_url)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        on_startup()
        try:
            yield
        finally:
            # The consumer's shutdown waits for its current message: keep the loop free meanwhile.
            await asyncio.to_thread(on_shutdown)
            await db.close()

    app = FastAPI(title="cornjacket ai-inference", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # The platform's error shape (SPEC §5): 400 with every problem listed.
        details = [
            {"field": ".".join(str(p) for p in e["loc"] if p != "body"), "message": e["msg"]}
            for e in exc.errors()
        ]
        return _error(400, "invalid request", details)

    @app.get("/livez")
    async def livez() -> JSONResponse:
        # Liveness: the process serves and its event loop answers. No dependency is asked, so a
        # database or broker outage never gets a healthy process restarted (that is /readyz's
        # job: take it out of traffic until the dependency is back).
        return JSONResponse({"status": "alive"})

    # Readiness is the deep check; /health stays, with the same answer, for compatibility.
    @app.get("/readyz")
    @app.get("/health")
    async def health() -> JSONResponse:
        checks: dict[str, dict[str, Any]] = {}
        try:
            await db.run(lambda c: c.execute("SELECT 1"), HEALTH_DB_TIMEOUT_S)
            checks["database"] = {"status": HEALTHY}
        except Exception as e:  # noqa: BLE001 - any failure is the check's answer
            error = str(e).strip() or f"no answer within {HEALTH_DB_TIMEOUT_S:g} s"
            checks["database"] = {"status": UNHEALTHY, "error": error}

        snap = state.snapshot()
        consumer: dict[str, Any] = {
            "group": settings.consumer_group,
            "topic": settings.sensor_topic,
            "partitions": list(snap.partitions),
            "lag": snap.lag,
        }
        if not snap.joined:
            consumer.update(status=UNHEALTHY, error="no partitions assigned yet")
        elif snap.blocked:
            consumer.update(status=DEGRADED, blocked=snap.blocked, blocked_for_s=snap.blocked_for_s)
        elif not snap.partitions:
            consumer.update(status=DEGRADED, error="in the group, but with no partition")
        else:
            consumer["status"] = HEALTHY
        checks["consumer"] = consumer

        if snap.brokers_up is None:
            checks["broker"] = {"status": HEALTHY, "brokers_up": None}
        else:
            checks["broker"] = {
                "status": HEALTHY if snap.brokers_up > 0 else DEGRADED,
                "brokers_up": snap.brokers_up,
            }
        checks["ingest"] = (
            {"status": DEGRADED, "error": snap.ingest_error} if snap.ingest_error else {"status": HEALTHY}
        )

        status = _worst(*(c["status"] for c in checks.values()))
        ordered = {k: {"status": v.pop("status"), **v} for k, v in checks.items()}
        return JSONResponse(
            {"status": status, "checks": ordered}, status_code=503 if status == UNHEALTHY else 200
        )

    @app.post("/infer")
    async def infer(req: InferRequest) -> JSONResponse:
        try:
            verdict = await db.run(
                lambda c: store.infer(c, req.device_id, req.key, req.value, params), QUERY_TIMEOUT_S
            )
        except Exception as e:  # noqa: BLE001
            log.warning("Inference failed: database unavailable.", extra={"error": str(e)})
            return _error(503, "database unavailable")
        return JSONResponse(
            {
                "device_id": req.device_id,
                "key": req.key,
                "value": req.value,
                "score": verdict.score,
                "is_anomaly": verdict.is_anomaly,
                "warming_up": verdict.warming_up,
                "readings": verdict.readings,
                "threshold": params.threshold,
                "model": MODEL_NAME,
                "model_version": MODEL_VERSION,
            }
        )

    @app.get("/model")
    async def model() -> JSONResponse:
        try:
            counts = await db.run(
                lambda c: store.model_counts(c, MODEL_DEVICE_LIMIT, MODEL_KEY_LIMIT), QUERY_TIMEOUT_S
            )
        except Exception as e:  # noqa: BLE001
            log.warning("Model listing failed: database unavailable.", extra={"error": str(e)})
            return _error(503, "database unavailable")
        return JSONResponse(
            {
                "model": MODEL_NAME,
                "model_version": MODEL_VERSION,
                "library": LIBRARY,
                "score": "|value - mean| / std (per device and key, Welford running mean and variance)",
                "threshold": params.threshold,
                "warmup": params.warmup,
                "horizon": params.horizon,
                "device_count": counts.device_count,
                # Readings learned per device, summed over its keys (for a device with one key,
                # as before keys existed, that key's count).
                "devices": counts.devices,
                "devices_truncated": counts.device_count > len(counts.devices),
                "model_count": counts.model_count,
                "keys": counts.keys,
                "keys_truncated": counts.keys_truncated,
            }
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
