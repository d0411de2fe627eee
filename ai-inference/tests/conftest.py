"""Fixtures: real PostgreSQL, a real Kafka-API broker, the real ingestion service and the sidecar
as a subprocess. Each test gets its own database, topic prefix and consumer group, so the suite
runs repeatedly and beside other suites on the shared broker."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from prometheus_client.parser import text_string_to_metric_families

from ai_inference.ids import uuid7

T = TypeVar("T")

AI_DIR = Path(__file__).resolve().parents[1]
REPO = AI_DIR.parent
ADMIN_DB_URL = os.environ.get(
    "CJ_TEST_DATABASE_URL",
    "postgres://cornjacket:cornjacket@127.0.0.1:5432/cornjacket?sslmode=disable",
)
BROKERS = os.environ.get("CJ_TEST_KAFKA_BROKERS", "127.0.0.1:9092")
CJ_BIN = Path(os.environ.get("CJ_BIN", str(REPO / "target" / "debug" / "cornjacket")))
JWT_SECRET = "ai-inference-test-secret-" + "x" * 16
PARTITIONS = 3


def unique(prefix: str) -> str:
    return f"{prefix}{int(time.time())}_{secrets.token_hex(3)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Polls `check` until it returns something truthy; fails naming `what` on time-out."""
    end = time.monotonic() + timeout_s
    last: T | None = None
    while time.monotonic() < end:
        last = check()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last: {last!r})")


def with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))


def base_env() -> dict[str, str]:
    """The caller's environment without any CJ_* setting, so a developer's shell cannot leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CJ_")}


# --- PostgreSQL -------------------------------------------------------------------------------


@dataclass
class Database:
    url: str

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql.encode(), params).fetchall()

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self.rows(sql, params)
        return rows[0][0] if rows else None

    def count(self, table: str, where: str = "TRUE", params: tuple[Any, ...] = ()) -> int:
        try:
            return int(self.scalar(f"SELECT count(*) FROM {table} WHERE {where}", params))
        except psycopg.errors.UndefinedTable:
            return 0


@pytest.fixture
def database() -> Iterator[Database]:
    # cjtest_*: `make clean-test-dbs` drops what an interrupted run leaves behind.
    name = unique("cjtest_ai_")
    with psycopg.connect(ADMIN_DB_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    try:
        yield Database(with_database(ADMIN_DB_URL, name))
    finally:
        drop_database(name)


def drop_database(name: str, timeout_s: float = 10) -> None:
    # FORCE refuses to terminate an autovacuum worker for a role that is not a superuser (it has
    # no role to be a member of), and with the other suites' databases around the launcher often
    # visits a fresh one: wait for the worker to move on.
    end = time.monotonic() + timeout_s
    while True:
        try:
            with psycopg.connect(ADMIN_DB_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode())
            return
        except psycopg.errors.InsufficientPrivilege:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


# --- the bus ----------------------------------------------------------------------------------


@dataclass
class Bus:
    prefix: str
    group: str
    producer: Producer
    admin: AdminClient

    @property
    def sensor_topic(self) -> str:
        return f"{self.prefix}sensor-events"

    def publish(
        self,
        value: bytes | dict[str, Any],
        key: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        if isinstance(value, dict):
            headers = {
                "event_type": value.get("event_type", ""),
                "event_id": value.get("event_id", ""),
                **(headers or {}),
            }
            tp = (value.get("metadata") or {}).get("traceparent")
            if tp:
                headers.setdefault("traceparent", tp)
            value = json.dumps(value).encode()
        errors: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        self.producer.produce(
            self.sensor_topic,
            key=key.encode(),
            value=value,
            headers=list((headers or {}).items()),
            on_delivery=delivered,
        )
        assert self.producer.flush(15) == 0, "messages still unsent after 15 s"
        assert not errors, errors

    def committed_total(self, group: str) -> int:
        """Messages the group has committed on the sensor topic, over all partitions (a fresh
        topic's offsets start at 0, so this is the count of messages behind the commits)."""
        c = Consumer({"bootstrap.servers": BROKERS, "group.id": group, "enable.auto.commit": False})
        try:
            tps = [TopicPartition(self.sensor_topic, p) for p in range(PARTITIONS)]
            return sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=10))
        finally:
            c.close()


@pytest.fixture
def bus() -> Iterator[Bus]:
    prefix = unique("pyt") + "."
    admin = AdminClient({"bootstrap.servers": BROKERS})
    topics = [f"{prefix}sensor-events", f"{prefix}system-events"]
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in topics],
        request_timeout=15,
    )
    for f in futures.values():
        f.result(timeout=20)
    producer = Producer({"bootstrap.servers": BROKERS, "linger.ms": 5, "acks": "all"})
    try:
        yield Bus(prefix, unique("pyt_ai_group_"), producer, admin)
    finally:
        producer.flush(5)
        try:
            # Including the topics the ingestion service created under the prefix.
            mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(prefix)]
            for f in admin.delete_topics(mine, request_timeout=10).values():
                f.result(timeout=15)
        except Exception:  # noqa: BLE001 - the broker's memory is cleaned at its restart anyway
            pass


# --- processes --------------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str
    _http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    def get(self, path: str) -> httpx.Response:
        return self._http.get(self.url + path)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self._http.post(self.url + path, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._http.close()
        return int(self.proc.returncode)

    def metric(self, name: str, **labels: str) -> float:
        """A sample of `/metrics` (0 when absent)."""
        text = self.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0


def _start(name: str, argv: list[str], env: dict[str, str], cwd: Path, log_path: Path, url: str) -> Process:
    log = log_path.open("wb")
    proc = subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()
    return Process(name, proc, log_path, url)


def _wait_healthy(p: Process, timeout_s: float) -> None:
    def ready() -> bool:
        if not p.alive():
            raise AssertionError(f"{p.name} exited with {p.proc.returncode}:\n{p.log()[-4000:]}")
        try:
            return p.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, timeout_s, f"{p.name} to be healthy", interval_s=0.2)
    except AssertionError:
        print(f"--- {p.name} log ---\n{p.log()[-4000:]}")
        raise


@dataclass
class Ingestion:
    url: str
    process: Process


@pytest.fixture
def ingestion(database: Database, bus: Bus, tmp_path: Path) -> Iterator[Ingestion]:
    """The platform's ingestion service alone (with its outbox processor), on a free port."""
    if not CJ_BIN.is_file():
        pytest.fail(f"the platform binary {CJ_BIN} is missing: build it (cargo build) or set CJ_BIN")
    port = free_port()
    env = base_env() | {
        "CJ_INGESTION_DATABASE_URL": database.url,
        "CJ_KAFKA_BROKERS": BROKERS,
        "CJ_KAFKA_TOPIC_PREFIX": bus.prefix,
        "CJ_INGESTION_PORT": str(port),
        "CJ_MQTT_URL": "off",
        "CJ_AUTH_MODE": "app",
        "CJ_JWT_SECRET": JWT_SECRET,
        "CJ_LOG_FORMAT": "text",
    }
    workdir = tmp_path / "ingestion"
    workdir.mkdir()  # away from the repository, so a developer's .env is not read
    p = _start(
        "ingestion",
        [str(CJ_BIN), "serve", "--services", "ingestion"],
        env,
        workdir,
        tmp_path / "ingestion.log",
        f"http://127.0.0.1:{port}",
    )
    try:
        _wait_healthy(p, 60)
        yield Ingestion(p.url, p)
    finally:
        p.stop()
        print(f"--- ingestion log (tail) ---\n{p.log()[-3000:]}")


class Sidecars:
    """Starts sidecar processes for a test and stops every one at its end."""

    def __init__(self, database: Database, bus: Bus, tmp_path: Path) -> None:
        self._database = database
        self._bus = bus
        self._tmp = tmp_path
        self.started: list[Process] = []

    def start(self, wait_healthy: bool = True, **env: str) -> Process:
        port = free_port()
        full = base_env() | {
            "PYTHONPATH": str(AI_DIR),
            "CJ_AI_DATABASE_URL": self._database.url,
            "CJ_KAFKA_BROKERS": BROKERS,
            "CJ_KAFKA_TOPIC_PREFIX": self._bus.prefix,
            "CJ_AI_CONSUMER_GROUP": self._bus.group,
            "CJ_AI_PORT": str(port),
            "CJ_BIND_ADDR": "127.0.0.1",
            # Nothing listens there unless a test passes the ingestion service's URL.
            "CJ_AI_INGEST_URL": f"http://127.0.0.1:{free_port()}",
            "CJ_JWT_SECRET": JWT_SECRET,
            "CJ_AI_SESSION_TIMEOUT_MS": "6000",
            "CJ_LOG_FORMAT": "text",
            "CJ_LOG_LEVEL": "info",
        }
        full.update(env)
        n = len(self.started) + 1
        p = _start(
            f"sidecar-{n}",
            [sys.executable, "-m", "ai_inference"],
            full,
            AI_DIR,
            self._tmp / f"sidecar-{n}.log",
            f"http://127.0.0.1:{port}",
        )
        self.started.append(p)
        if wait_healthy:
            _wait_healthy(p, 60)
        return p

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()
            print(f"--- {p.name} log (tail) ---\n{p.log()[-6000:]}")


@pytest.fixture
def sidecars(database: Database, bus: Bus, tmp_path: Path) -> Iterator[Sidecars]:
    s = Sidecars(database, bus, tmp_path)
    try:
        yield s
    finally:
        s.stop_all()


# --- events -----------------------------------------------------------------------------------


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def reading(
    device: str,
    value: Any,
    t: datetime,
    *,
    event_id: str | None = None,
    event_type: str = "sensor.reading",
    traceparent: str | None = None,
    payload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A bus envelope as the platform's outbox processor publishes it (`payload` replaces the
    legacy `{"value": value, "unit": "celsius"}`)."""
    return {
        "event_id": event_id or str(uuid7()),
        "event_type": event_type,
        "aggregate_id": device,
        "event_time": rfc3339(t),
        "ingested_at": rfc3339(t),
        "payload": payload if payload is not None else {"value": value, "unit": "celsius"},
        "metadata": {
            "source": "http",
            "traceparent": traceparent or new_traceparent(),
            "schema_version": 1,
            "subject": "tests",
        },
    }


def multi_reading(
    device: str,
    values: dict[str, Any],
    t: datetime,
    *,
    units: dict[str, str] | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A multi-key `sensor.reading` envelope: `{"values": values, "units": units}`."""
    payload: dict[str, Any] = {"values": values}
    if units is not None:
        payload["units"] = units
    return reading(device, None, t, event_id=event_id, payload=payload)


# --- a TCP proxy that can be cut ---------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to an upstream; `cut()` drops every connection and refuses new
    ones until `restore()` — a database that went away, as the client sees it."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._cut = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        for s in socks:
            with self._lock:
                self._sockets.discard(s)
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            socks = list(self._sockets)
        self._drop(*socks)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._listener.close()
        self._thread.join(2)


@pytest.fixture
def db_proxy(database: Database) -> Iterator[TcpProxy]:
    parts = urlsplit(database.url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    try:
        yield proxy
    finally:
        proxy.close()
