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
# A quantity's key, as the platform's ingestion validates it: ASCII only, so a key is safe in a
# log line, an error message and a column alike.
_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")
KEY_RULE = "an identifier (1 to 64 characters: a letter, then letters, digits, '_', '.' or '-')"
# The key of a legacy reading (`payload.value`) that names no `metric`; also every result and
# model state stored before quantities had keys (migration V4).
DEFAULT_KEY = "value"
MAX_VALUES = 32
# A payload with many bad entries is refused naming the first few, not all of them.
_MAX_PROBLEMS = 5


def is_key(v: object) -> bool:
    return isinstance(v, str) and _KEY_RE.fullmatch(v) is not None


@dataclass(frozen=True)
class Quantity:
    """One measured quantity of a reading; each is scored by a model of its own."""

    key: str
    value: float


@dataclass(frozen=True)
class Reading:
    """A `sensor.reading` taken off the bus."""

    event_id: UUID
    device_id: str
    event_time: datetime
    event_time_text: str  # as the producer wrote it, to hand on unchanged
    quantities: tuple[Quantity, ...]  # at least one, keys distinct
    traceparent: str | None
    # `payload.value` rather than `payload.values`: exactly one quantity, which results stored
    # before migration V4 recorded under DEFAULT_KEY whatever its `metric` (see store.py).
    legacy: bool


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
    quantities = _quantities(payload)  # type: ignore[arg-type]

    return Reading(
        event_id=event_id,  # type: ignore[arg-type]
        device_id=device,  # type: ignore[arg-type]
        event_time=event_time,  # type: ignore[arg-type]
        event_time_text=env["event_time"],
        quantities=quantities,
        traceparent=_traceparent(env, headers),
        legacy="values" not in payload,  # type: ignore[operator]
    )


def _number(v: object) -> float | None:
    """`v` as a float when it is a finite JSON number, else None."""
    # bool is an int in Python but not a number in JSON; a huge integer overflows a float.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _non_empty(v: object) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _quantities(payload: dict[str, Any]) -> tuple[Quantity, ...]:
    """The quantities of a `sensor.reading` payload in either accepted shape; raises `Poison`.

    Legacy `{"value", "unit", "metric"?}` is one quantity keyed by its `metric`, else
    DEFAULT_KEY; `{"values", "units"?}` is one per entry of `values`. The shapes are checked as
    the platform's ingestion checks them, so a payload it would refuse (say one edited in the
    DLQ before a replay) is refused here too rather than scored under a made-up key. Every
    problem is named (the first few), in the wording the DLQ has always used
    ("sensor.reading payload.value must be a finite number").
    """
    problems: list[str] = []
    found: list[Quantity] = []
    if "value" in payload and "values" in payload:
        problems.append("payload must have value or values, not both")
    elif "values" in payload:
        values, units = payload["values"], payload.get("units")
        if not isinstance(values, dict) or not 1 <= len(values) <= MAX_VALUES:
            problems.append(f"payload.values must be an object of 1 to {MAX_VALUES} entries")
            values = None
        for k, v in (values or {}).items():
            if not is_key(k):
                # The key itself is not shown: it may be long or hold characters (NUL) that
                # the DLQ's text column refuses.
                problems.append(f"payload.values must have keys that are {KEY_RULE}")
                continue
            f = _number(v)
            if f is None:
                problems.append(f"payload.values.{k} must be a finite number")
            else:
                found.append(Quantity(k, f))
        if "units" in payload:
            if not isinstance(units, dict):
                problems.append("payload.units must be an object")
            elif values is not None:
                for k, u in units.items():
                    if k not in values or not is_key(k):
                        problems.append("payload.units must have keys of payload.values only")
                    elif not _non_empty(u):
                        problems.append(f"payload.units.{k} must be a non-empty string")
    else:
        f = _number(payload.get("value"))
        key = payload.get("metric", DEFAULT_KEY)
        if f is None:
            problems.append("payload.value must be a finite number")
        if not _non_empty(payload.get("unit")):
            problems.append("payload.unit must be a non-empty string")
        if not is_key(key):
            problems.append(f"payload.metric must be {KEY_RULE}")
        if f is not None and is_key(key):
            found.append(Quantity(key, f))
    if problems:
        shown = list(dict.fromkeys(problems))
        more = f"; and {len(shown) - _MAX_PROBLEMS} more" if len(shown) > _MAX_PROBLEMS else ""
        raise Poison("sensor.reading " + "; ".join(shown[:_MAX_PROBLEMS]) + more)
    return tuple(found)


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
