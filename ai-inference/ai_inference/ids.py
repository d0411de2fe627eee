"""Identifiers: UUID v7 everywhere (ADR-0013), including the one derived from a source event."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from datetime import UTC, datetime, timedelta

from ai_inference.envelope import DEFAULT_KEY

# Domain separation for derived ids: changing it would re-emit every anomaly on replay.
_ANOMALY_DOMAIN = b"cornjacket/ai-inference/ai.anomaly/v1\x00"
# For the quantities keyed other than DEFAULT_KEY (multi-key readings, or a legacy `metric`).
_ANOMALY_KEY_DOMAIN = b"cornjacket/ai-inference/ai.anomaly/v1/key\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _v7(unix_ms: int, rand: bytes) -> uuid.UUID:
    """A UUID v7 from a millisecond timestamp and at least 10 bytes of (pseudo-)random bits."""
    unix_ms = max(0, min(unix_ms, (1 << 48) - 1))
    rand_a = int.from_bytes(rand[:2], "big") & 0x0FFF
    rand_b = int.from_bytes(rand[2:10], "big") & ((1 << 62) - 1)
    value = (unix_ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def uuid7() -> uuid.UUID:
    """A fresh, time-ordered UUID v7 (Python 3.11's uuid module has none)."""
    return _v7(time.time_ns() // 1_000_000, os.urandom(10))


def anomaly_event_id(
    source_event_id: uuid.UUID, source_event_time: datetime, key: str = DEFAULT_KEY
) -> uuid.UUID:
    """The `ai.anomaly` event id for one quantity (`key`) of a source reading.

    Deterministic, so a redelivered reading resubmits the same id and the ingestion API answers
    with the original event instead of storing a second one; still a v7 (time = the reading's
    event_time) so it sorts with the platform's other ids. Distinct per key, so two anomalous
    quantities of one reading are two events. The default key hashes exactly as before keys
    existed, so a reading scored before (a legacy one) keeps its anomaly's id on redelivery.
    """
    material = _ANOMALY_DOMAIN + source_event_id.bytes
    if key != DEFAULT_KEY:
        # The source id has a fixed length, so what follows it is the key, unambiguously.
        material = _ANOMALY_KEY_DOMAIN + source_event_id.bytes + key.encode()
    digest = hashlib.sha256(material).digest()
    unix_ms = (source_event_time - _EPOCH) // timedelta(milliseconds=1)
    return _v7(unix_ms, digest)
