"""The bus consumer: sensor readings in, scores to PostgreSQL, anomalies to the ingestion API.

At-least-once (ADR-0004): a message's offset is stored only once everything it causes is durable
(its result row, its `ai.anomaly` accepted by the API, or its dead letter), and only stored offsets
are committed. Poison goes to `ai.dlq` and is committed; an outage of the database, the broker or
the ingestion API blocks the consumer on the message at hand and retries until it recovers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from ai_inference import store
from ai_inference.config import Settings
from ai_inference.db import OUTAGE_ERRORS, connect
from ai_inference.handler import Handler, Refused
from ai_inference.ingest import Disposition, IngestClient, Submission
from ai_inference.metrics import Metrics
from ai_inference.model import ModelParams
from ai_inference.state import ServiceState

log = logging.getLogger(__name__)

# How long commits are held after the brokers were lost (see InferenceConsumer._on_error).
COMMIT_HOLD_S = 30.0

T = TypeVar("T")

BATCH = 100
POLL_TIMEOUT_S = 0.5
MAX_BACKOFF_S = 10.0
MISCONFIGURED_BACKOFF_S = 30.0
# While blocked, repeat the warning this often rather than at every retry.
REPEAT_WARNING_S = 30.0


def kafka_config(settings: Settings) -> dict[str, object]:
    return {
        "bootstrap.servers": settings.kafka_brokers,
        "client.id": "ai-inference",
        "group.id": settings.consumer_group,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(100, min(1000, settings.session_timeout_ms // 3)),
        # Tansu (the broker on machines without containers) speaks the classic eager protocol.
        "partition.assignment.strategy": "range,roundrobin",
        "statistics.interval.ms": 2000,
        "fetch.wait.max.ms": settings.fetch_wait_max_ms,
        "socket.keepalive.enable": True,
        "reconnect.backoff.max.ms": 2000,
        # A consumer that rejoins a restarted broker before the platform has recreated the topic
        # is assigned nothing, and librdkafka looks at the topic again only on the next metadata
        # refresh (5 minutes by default). The platform's Rust clients use the same value.
        "topic.metadata.refresh.interval.ms": 5000,
    }


def ensure_topic(settings: Settings) -> None:
    """Creates the sensor topic if it is missing (as the platform does), so the consumer does not
    wait on a platform that starts later; any failure is left to the consumer's own retries."""
    # log_level 4: librdkafka's informational chatter about a short-lived client is noise here.
    admin = AdminClient(
        {"bootstrap.servers": settings.kafka_brokers, "socket.timeout.ms": 5000, "log_level": 4}
    )
    topic = NewTopic(
        settings.sensor_topic,
        num_partitions=settings.kafka_partitions,
        replication_factor=1,
        config={"retention.ms": str(settings.kafka_retention_ms)},
    )
    try:
        admin.create_topics([topic], request_timeout=5.0)[settings.sensor_topic].result(timeout=10)
        log.info("Topic created.", extra={"topic": settings.sensor_topic})
    except KafkaException as e:
        if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            log.warning(
                "Could not create the topic.", extra={"topic": settings.sensor_topic, "error": str(e)}
            )
    except Exception as e:  # noqa: BLE001 - a timeout here is not fatal: the consumer retries
        log.warning("Could not create the topic.", extra={"topic": settings.sensor_topic, "error": str(e)})


class _Stopped(Exception):
    """Shutdown was requested while blocked on a message: leave it uncommitted."""


class InferenceConsumer:
    def __init__(
        self,
        settings: Settings,
        state: ServiceState,
        metrics: Metrics,
        ingest: IngestClient,
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self._settings = settings
        self._params = ModelParams(settings.threshold, settings.warmup, settings.horizon)
        self._state = state
        self._metrics = metrics
        self._ingest = ingest
        self._handler = Handler(self._params, metrics, self._with_db, self._submit)
        self._on_fatal = on_fatal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="consumer", daemon=True)
        self._db: psycopg.Connection | None = None
        self._consumer: Consumer | None = None
        self._broker_lost_at: float | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("The consumer did not stop in time.", extra={"timeout_s": timeout_s})

    def _run(self) -> None:
        try:
            ensure_topic(self._settings)
            self._consume()
        except BaseException as e:  # noqa: BLE001 - any escape is fatal for the whole process
            log.critical("The consumer failed.", exc_info=True)
            self._on_fatal(e)
        finally:
            if self._db is not None:
                self._db.close()

    def _consume(self) -> None:
        conf = kafka_config(self._settings)
        conf.update(
            {
                "error_cb": self._on_error,
                "stats_cb": self._on_stats,
                "logger": logging.getLogger("librdkafka"),
            }
        )
        consumer = Consumer(conf)
        self._consumer = consumer
        consumer.subscribe(
            [self._settings.sensor_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "Consuming.",
            extra={"topic": self._settings.sensor_topic, "group": self._settings.consumer_group},
        )
        try:
            while not self._stop.is_set():
                handled = 0
                try:
                    for msg in self._next_batch(consumer):
                        err = msg.error()
                        if err is not None:
                            self._on_message_error(err)
                            continue
                        self._handle(msg)
                        self._store_offset(msg)
                        handled += 1
                except _Stopped:
                    pass
                if handled:
                    self._commit()
        finally:
            self._commit()
            consumer.close()
            self._state.left()
            log.info("Consumer closed.")

    @staticmethod
    def _next_batch(consumer: Consumer) -> list[Message]:
        # consume(n, timeout) waits for n messages or the whole timeout, which would delay a lone
        # reading by up to that long: wait for one, then take whatever else is already fetched.
        first = consumer.poll(POLL_TIMEOUT_S)
        if first is None:
            return []
        return [first, *consumer.consume(num_messages=BATCH - 1, timeout=0)]

    # --- one message -------------------------------------------------------------------------

    def _handle(self, msg: Message) -> None:
        started = time.monotonic()
        try:
            outcome = self._handler.handle(msg.value(), msg.headers())
        except Refused as e:
            self._dead_letter(msg, e.error, e.reason)
            return
        self._metrics.messages.labels(outcome=outcome).inc()
        if outcome != "skipped":
            self._metrics.latency.observe(time.monotonic() - started)

    def _dead_letter(self, msg: Message, error: str, reason: str) -> None:
        letter = store.DeadLetter(
            consumer=self._settings.consumer_group,
            topic=msg.topic() or "",
            partition=msg.partition() or 0,
            offset=msg.offset() or 0,
            payload=msg.value(),
            error=error,
        )
        self._with_db(lambda db: store.dead_letter(db, letter))
        self._metrics.dlq.labels(reason=reason).inc()
        self._metrics.messages.labels(outcome="dead_lettered").inc()
        log.warning(
            "Message dead-lettered.",
            extra={
                "topic": letter.topic,
                "partition": letter.partition,
                "offset": letter.offset,
                "error": error,
            },
        )

    # --- blocking retries --------------------------------------------------------------------

    def _with_db(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Runs `fn` on the consumer's connection, reconnecting and retrying through outages."""
        delay, last_warning = 0.5, None
        while True:
            try:
                if self._db is None or self._db.closed:
                    self._db = connect(self._settings.database_url, autocommit=True)
                out = fn(self._db)
                if last_warning is not None:
                    log.info("Database available again; resuming.")
                    self._state.unblock()
                return out
            except OUTAGE_ERRORS as e:
                self._drop_db()
                reason = f"database unavailable: {e}".strip()
            except psycopg.DataError:
                raise
            except psycopg.Error as e:
                # Not an outage and not the data: a schema or permission problem. Blocking keeps
                # the message; the log says why.
                reason = f"database error: {type(e).__name__}: {e}".strip()
            self._state.block(reason)
            now = time.monotonic()
            if last_warning is None or now - last_warning >= REPEAT_WARNING_S:
                log.warning("Blocked; retrying.", extra={"reason": reason, "retry_in_s": delay})
                last_warning = now
            if self._stop.wait(delay):
                raise _Stopped
            delay = min(delay * 2, MAX_BACKOFF_S)

    def _drop_db(self) -> None:
        if self._db is not None:
            # Closing a broken connection may fail too.
            with contextlib.suppress(Exception):
                self._db.close()
        self._db = None

    def _submit(self, result: store.Result) -> Submission:
        delay, last_warning = 0.5, None
        while True:
            sub = self._ingest.submit(result)
            if sub.disposition in (Disposition.ACCEPTED, Disposition.REJECTED):
                if last_warning is not None:
                    log.info("Ingestion API answering again; resuming.")
                self._state.ingest(None)
                self._state.unblock()
                return sub
            if sub.disposition is Disposition.MISCONFIGURED:
                reason = (
                    f"the ingestion API refused the request ({sub.status}): check CJ_AI_INGEST_URL "
                    "and CJ_AI_INGEST_TOKEN / CJ_JWT_SECRET"
                )
                self._state.ingest(reason)
                wait, level = MISCONFIGURED_BACKOFF_S, logging.ERROR
            else:
                reason = f"ingestion API unavailable ({sub.status or sub.detail})"
                wait = min(sub.retry_after_s, MAX_BACKOFF_S) if sub.retry_after_s else delay
                delay, level = min(delay * 2, MAX_BACKOFF_S), logging.WARNING
            self._state.block(reason)
            now = time.monotonic()
            if last_warning is None or now - last_warning >= REPEAT_WARNING_S:
                log.log(
                    level,
                    "Blocked; retrying.",
                    extra={"reason": reason, "detail": sub.detail[:500], "retry_in_s": wait},
                )
                last_warning = now
            if self._stop.wait(wait):
                raise _Stopped

    # --- offsets -----------------------------------------------------------------------------

    def _store_offset(self, msg: Message) -> None:
        assert self._consumer is not None
        # A position behind the message means its partition was reset while it was handled (its
        # topic was recreated; the patched librdkafka resets such partitions): its offset belongs
        # to the old topic and must not be stored for the new one.
        pos = self._consumer.position([TopicPartition(msg.topic(), msg.partition())])
        if not pos or pos[0].offset <= msg.offset():
            log.warning(
                "The partition was reset while its message was handled; not storing the old offset.",
                extra={"partition": msg.partition(), "offset": msg.offset()},
            )
            return
        try:
            self._consumer.store_offsets(message=msg)
        except KafkaException as e:
            # The partition moved on during a long block: its new owner redelivers, harmlessly.
            log.info("Offset not stored.", extra={"partition": msg.partition(), "error": str(e)})

    def _commit(self) -> None:
        assert self._consumer is not None
        if self._commits_held():
            # See _on_error: positions of a lost topic must not reach the broker that lost it.
            log.debug("Brokers were lost recently; holding the offset commit.")
            return
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:
                # Stored offsets stay stored: the next commit carries them.
                log.warning("Commit failed.", extra={"error": str(e)})

    # --- librdkafka callbacks (run inside consume()) ----------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._state.assigned([(p.topic, p.partition) for p in partitions])
        self._metrics.assigned.set(len(self._state.snapshot().partitions))
        log.info("Partitions assigned.", extra={"partitions": [p.partition for p in partitions]})

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Hand over what is done, so the next owner starts after it.
        self._commit()
        self._state.revoked([(p.topic, p.partition) for p in partitions])
        self._metrics.assigned.set(len(self._state.snapshot().partitions))
        log.info("Partitions revoked.", extra={"partitions": [p.partition for p in partitions]})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._state.revoked([(p.topic, p.partition) for p in partitions], lost=True)
        self._metrics.assigned.set(0)
        log.warning("Partitions lost.", extra={"partitions": [p.partition for p in partitions]})

    def _on_message_error(self, err: KafkaError) -> None:
        if err.fatal():
            raise KafkaException(err)
        log.warning("Kafka consumer error.", extra={"error": str(err)})

    def _on_error(self, err: KafkaError) -> None:
        log.warning("Kafka client error.", extra={"error": str(err)})
        if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            # A broker that comes back empty (memory storage) would otherwise be sent positions
            # of the topics it lost, from messages fetched before and handled after the loss,
            # before the client notices the topics were recreated; the next owner would start
            # past the head of the new log. Holding commits costs only redelivery. The Rust
            # consumers do the same (ConsumerState::commits_held, COMMIT_HOLD).
            self._broker_lost_at = time.monotonic()

    def _commits_held(self) -> bool:
        lost = self._broker_lost_at
        return lost is not None and time.monotonic() - lost < COMMIT_HOLD_S

    def _on_stats(self, raw: str) -> None:
        try:
            stats = json.loads(raw)
        except ValueError:
            return
        up = sum(
            1
            for b in stats.get("brokers", {}).values()
            if b.get("source") != "logical" and b.get("state") == "UP"
        )
        lags = [
            p["consumer_lag"]
            for t in stats.get("topics", {}).values()
            for pid, p in t.get("partitions", {}).items()
            if pid != "-1" and p.get("consumer_lag", -1) >= 0
        ]
        lag = sum(lags) if lags else None
        self._state.kafka_stats(up, lag)
        if lag is not None:
            self._metrics.lag.set(lag)
