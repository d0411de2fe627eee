"""Reading the platform's event envelope (SPEC §5) off the bus; consumers trust nothing."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

SENSOR_READING = "sensor.reading"

_EVENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_TRACEPARENT_RE = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


@dataclass(frozen=True)
class Reading:
    """A `sensor.reading` taken off the bus."""

    event_id: UUID
    device_id: str
    event_time: datetime
    event_time_text: str  # as the producer wrote it, to hand on unchanged
    value: float
    traceparent: str | None


# As confluent-kafka hands them over.
Headers = list[tuple[str, str | bytes | None]] | dict[str, str | bytes | None] | None


class Poison(Exception):
    """A message that can never be processed: it goes to the DLQ."""


@dataclass(frozen=True)
class Skip:
    """A well-formed event this consumer has no business with."""

    event_type: str


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(raw: bytes) -> Any:
    """JSON as RFC 8259 defines it: Python's NaN/Infinity extensions are refused."""
    return json.loads(raw, parse_constant=_no_constants)


def is_traceparent(v: object) -> bool:
    return isinstance(v, str) and bool(_TRACEPARENT_RE.match(v)) and v[3:35] != "0" * 32


def parse_time(v: object) -> datetime:
    if not isinstance(v, str) or not _RFC3339_RE.match(v):
        raise ValueError("must be an RFC 3339 timestamp")
    return datetime.fromisoformat(v.replace("t", "T").replace("z", "Z"))


def decode(value: bytes | None, headers: Headers) -> Reading | Skip:
    """A sensor reading from a bus message, `Skip` for other event types; raises `Poison`."""
    if not value:
        raise Poison("empty message")
    try:
        env = loads_strict(value)
    except (ValueError, RecursionError) as e:
        raise Poison(f"undecodable JSON: {e}") from None
    if not isinstance(env, dict):
        raise Poison("not an envelope: not a JSON object")

    problems: list[str] = []
    event_type = env.get("event_type")
    if not isinstance(event_type, str) or len(event_type) > 128 or not _EVENT_TYPE_RE.match(event_type):
        problems.append("event_type: must be dotted lowercase segments such as sensor.reading")
    event_id: UUID | None = None
    try:
        event_id = UUID(env.get("event_id") if isinstance(env.get("event_id"), str) else "")
    except ValueError:
        problems.append("event_id: must be a UUID")
    device = env.get("aggregate_id")
    if not isinstance(device, str) or not 1 <= len(device) <= 256 or not device.isprintable():
        problems.append("aggregate_id: must be 1 to 256 printable characters")
    event_time: datetime | None = None
    try:
        event_time = parse_time(env.get("event_time"))
    except ValueError as e:
        problems.append(f"event_time: {e}")
    payload = env.get("payload")
    if not isinstance(payload, dict):
        problems.append("payload: must be a JSON object")
    if problems:
        raise Poison("not an envelope: " + "; ".join(problems))

    if event_type != SENSOR_READING:
        return Skip(str(event_type))
    v = payload.get("value")  # type: ignore[union-attr]
    try:
        # bool is an int in Python but not a number in JSON; a huge integer overflows a float.
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise OverflowError
    except OverflowError:
        raise Poison("sensor.reading payload.value must be a finite number") from None

    return Reading(
        event_id=event_id,  # type: ignore[arg-type]
        device_id=device,  # type: ignore[arg-type]
        event_time=event_time,  # type: ignore[arg-type]
        event_time_text=env["event_time"],
        value=float(v),
        traceparent=_traceparent(env, headers),
    )


def _traceparent(env: dict[str, Any], headers: Headers) -> str | None:
    """The bus header wins (it is what the producer set for this delivery), then the metadata."""
    pairs = headers.items() if isinstance(headers, dict) else headers or []
    for k, v in pairs:
        if k == "traceparent" and v is not None:
            tp = v.decode("ascii", errors="replace") if isinstance(v, bytes) else v
            if is_traceparent(tp):
                return tp
    meta = env.get("metadata")
    found = meta.get("traceparent") if isinstance(meta, dict) else None
    return found if isinstance(found, str) and is_traceparent(found) else None
