"""Entry point: configuration, migrations, then the consumer, the DLQ replay worker and the HTTP
server together.

Migrations run before the port opens (SPEC §4). SIGTERM/SIGINT stop uvicorn, whose shutdown
stops the replay worker after its current row and the consumer after its current message, which
then commits; a consumer failure stops the server and the process exits non-zero (SPEC §13).
"""

from __future__ import annotations

import logging
import signal
import sys

import uvicorn

from ai_inference.api import create_app
from ai_inference.config import ConfigError, load_settings
from ai_inference.consumer import InferenceConsumer
from ai_inference.db import MigrationError, migrate_with_retry
from ai_inference.ingest import IngestClient, TokenSource
from ai_inference.logs import setup_logging
from ai_inference.metrics import Metrics
from ai_inference.model import LIBRARY, MODEL_NAME, MODEL_VERSION
from ai_inference.replay import ReplayWorker
from ai_inference.retention import RetentionJob
from ai_inference.state import ServiceState

log = logging.getLogger("ai_inference")


def main() -> int:
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"ai-inference: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)

    try:
        applied = migrate_with_retry(settings.database_url)
    except MigrationError as e:
        log.critical("Migrations failed.", extra={"error": str(e)})
        return 1
    except Exception as e:  # noqa: BLE001 - e.g. the database never came up
        log.critical("Migrations failed.", extra={"error": f"{type(e).__name__}: {e}"})
        return 1
    log.info("Schema ai is up to date.", extra={"applied": applied})

    tokens = TokenSource(settings)
    if tokens.kind == "none":
        log.warning("No CJ_AI_INGEST_TOKEN or CJ_JWT_SECRET: anomalies are submitted unauthenticated.")

    state, metrics = ServiceState(), Metrics()
    ingest = IngestClient(settings, metrics, tokens)
    failure: list[BaseException] = []
    server: uvicorn.Server | None = None

    def fatal(e: BaseException) -> None:
        failure.append(e)
        if server is not None:
            server.should_exit = True

    consumer = InferenceConsumer(settings, state, metrics, ingest, on_fatal=fatal)
    # A client of its own: the worker's submissions never wait behind the consumer's.
    replay_ingest = IngestClient(settings, metrics, tokens)
    replay = ReplayWorker(settings, metrics, replay_ingest)

    def start() -> None:
        consumer.start()
        replay.start()

    def stop() -> None:
        replay.stop()
        consumer.stop()

    app = create_app(settings, state, metrics, on_startup=start, on_shutdown=stop)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.bind_addr,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
    )
    log.info(
        "Starting.",
        extra={
            "model": MODEL_NAME,
            "model_version": MODEL_VERSION,
            "library": LIBRARY,
            "threshold": settings.threshold,
            "warmup": settings.warmup,
            "topic": settings.sensor_topic,
            "group": settings.consumer_group,
            "listen": f"{settings.bind_addr}:{settings.port}",
            "token": tokens.kind,
        },
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; with the default
    # handlers in place that would turn a clean SIGTERM shutdown into exit status 143.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    retention = (
        RetentionJob(settings.database_url, settings.retention_ms, settings.retention_interval_ms)
        if settings.retention_enabled
        else None
    )
    if retention is not None:
        retention.start()
    try:
        server.run()
    except SystemExit as e:
        # uvicorn exits this way when it cannot bind; the consumer may already be running.
        stop()
        log.critical("The HTTP server could not start.", extra={"port": settings.port})
        return int(e.code) if isinstance(e.code, int) and e.code else 1
    finally:
        ingest.close()
        replay_ingest.close()
        if retention is not None:
            retention.stop()
    if failure or not server.started:
        return 1
    log.info("Stopped.")
    return 0
