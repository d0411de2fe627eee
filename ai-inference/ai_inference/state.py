"""What the consumer thread knows about itself, read by `/health` from the HTTP thread."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Snapshot:
    joined: bool
    partitions: tuple[str, ...]
    brokers_up: int | None
    lag: int | None
    blocked: str | None
    blocked_for_s: float | None
    ingest_error: str | None


class ServiceState:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._joined = False
        self._partitions: set[tuple[str, int]] = set()
        self._brokers_up: int | None = None
        self._lag: int | None = None
        self._blocked: str | None = None
        self._blocked_since: float | None = None
        self._ingest_error: str | None = None

    def assigned(self, partitions: list[tuple[str, int]]) -> None:
        with self._lock:
            self._joined = True
            self._partitions |= set(partitions)

    def revoked(self, partitions: list[tuple[str, int]], lost: bool = False) -> None:
        with self._lock:
            self._partitions -= set(partitions)
            if lost:
                self._joined = False

    def left(self) -> None:
        with self._lock:
            self._joined = False
            self._partitions.clear()

    def kafka_stats(self, brokers_up: int, lag: int | None) -> None:
        with self._lock:
            self._brokers_up = brokers_up
            self._lag = lag

    def block(self, reason: str) -> None:
        with self._lock:
            if self._blocked is None:
                self._blocked_since = time.monotonic()
            self._blocked = reason

    def unblock(self) -> None:
        with self._lock:
            self._blocked = None
            self._blocked_since = None

    def ingest(self, error: str | None) -> None:
        with self._lock:
            self._ingest_error = error

    def snapshot(self) -> Snapshot:
        with self._lock:
            since = self._blocked_since
            return Snapshot(
                joined=self._joined,
                partitions=tuple(f"{t}[{p}]" for t, p in sorted(self._partitions)),
                brokers_up=self._brokers_up,
                lag=self._lag,
                blocked=self._blocked,
                blocked_for_s=None if since is None else round(time.monotonic() - since, 1),
                ingest_error=self._ingest_error,
            )
