"""Decoding bus messages, derived ids and service tokens: the pure parts, no infrastructure."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import jwt
import pytest

from ai_inference.config import load_settings
from ai_inference.envelope import Poison, Reading, Skip, decode
from ai_inference.ids import anomaly_event_id, uuid7
from ai_inference.ingest import Disposition, TokenSource, classify
from conftest import JWT_SECRET, reading

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def test_a_sensor_reading_decodes() -> None:
    env = reading("dev-1", 21.5, T0, traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")
    r = decode(json.dumps(env).encode(), None)
    assert isinstance(r, Reading)
    assert (r.device_id, r.value, r.event_time, str(r.event_id)) == ("dev-1", 21.5, T0, env["event_id"])
    assert r.event_time_text == env["event_time"]
    assert r.traceparent == env["metadata"]["traceparent"]


def test_the_bus_header_traceparent_wins() -> None:
    env = reading("dev-1", 1, T0)
    header = "00-" + "12" * 16 + "-" + "34" * 8 + "-01"
    r = decode(json.dumps(env).encode(), [("traceparent", header.encode())])
    assert isinstance(r, Reading) and r.traceparent == header


def test_other_event_types_are_skipped() -> None:
    env = reading("dev-1", 1, T0, event_type="sensor.status")
    assert decode(json.dumps(env).encode(), None) == Skip("sensor.status")
    env = reading("dev-1", 1, T0, event_type="ai.anomaly")
    assert decode(json.dumps(env).encode(), None) == Skip("ai.anomaly")


def _with(**changes: object) -> bytes:
    env = reading("dev-1", 1.0, T0)
    for k, v in changes.items():
        if k == "value":
            env["payload"]["value"] = v
        elif v is None:
            del env[k]
        else:
            env[k] = v
    return json.dumps(env).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe not json",
        b"[1, 2]",
        b'{"event_type": "sensor.reading"}',
        _with(event_id="not-a-uuid"),
        _with(event_type="Sensor Reading"),
        _with(aggregate_id=""),
        _with(aggregate_id="bad\x00id"),
        _with(event_time="yesterday"),
        _with(payload=None),
        _with(value="hot"),
        _with(value=True),
        _with(value=None),
        _with(value=[1]),
        _with().replace(b'"value": 1.0', b'"value": NaN'),
        _with().replace(b'"value": 1.0', b'"value": Infinity'),
        _with().replace(b'"value": 1.0', b'"value": 1' + b"0" * 400),
        b"[" * 100_000,
    ],
)
def test_poison(raw: bytes) -> None:
    with pytest.raises(Poison):
        decode(raw, None)


def test_the_anomaly_id_is_deterministic_and_a_v7() -> None:
    source = uuid7()
    a = anomaly_event_id(source, T0)
    assert a == anomaly_event_id(source, T0)
    assert a != anomaly_event_id(uuid7(), T0)
    assert a.version == 7 and a.variant == uuid.RFC_4122
    assert int.from_bytes(a.bytes[:6], "big") == int(T0.timestamp() * 1000)


def test_uuid7_is_time_ordered() -> None:
    ids = [uuid7() for _ in range(50)]
    assert all(i.version == 7 for i in ids)
    assert [i.bytes[:6] for i in ids] == sorted(i.bytes[:6] for i in ids)


def test_a_minted_token_carries_the_service_claims() -> None:
    s = load_settings({"CJ_JWT_SECRET": JWT_SECRET, "CJ_JWT_ISSUER": "cj", "CJ_JWT_AUDIENCE": "platform"})
    tokens = TokenSource(s, clock=lambda: 1_000_000.0)
    claims = jwt.decode(
        tokens.token() or "",
        JWT_SECRET,
        algorithms=["HS256"],
        audience="platform",
        issuer="cj",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims["sub"] == "ai-inference" and claims["scope"] == "ingest:write"
    assert claims["exp"] - claims["iat"] == 3600


def test_a_configured_token_wins_and_none_is_none() -> None:
    s = load_settings({"CJ_JWT_SECRET": JWT_SECRET, "CJ_AI_INGEST_TOKEN": "given"})
    assert TokenSource(s).token() == "given"
    assert TokenSource(load_settings({})).token() is None


def test_a_minted_token_is_renewed_before_it_expires() -> None:
    now = [1_000_000.0]
    tokens = TokenSource(load_settings({"CJ_JWT_SECRET": JWT_SECRET}), clock=lambda: now[0])
    first = tokens.token()
    now[0] += 60
    assert tokens.token() == first
    now[0] += 3500
    assert tokens.token() != first


@pytest.mark.parametrize(
    ("status", "disposition"),
    [
        (202, Disposition.ACCEPTED),
        (400, Disposition.REJECTED),
        (401, Disposition.MISCONFIGURED),
        (403, Disposition.MISCONFIGURED),
        (404, Disposition.MISCONFIGURED),
        (429, Disposition.RETRY),
        (500, Disposition.RETRY),
        (503, Disposition.RETRY),
    ],
)
def test_ingest_answers_are_classified(status: int, disposition: Disposition) -> None:
    assert classify(status) is disposition
