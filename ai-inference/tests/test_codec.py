"""Decoding bus messages, derived ids and service tokens: the pure parts, no infrastructure."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime

import jwt
import pytest

from ai_inference.config import load_settings
from ai_inference.envelope import Poison, Quantity, Reading, Skip, decode
from ai_inference.ids import _v7, anomaly_event_id, uuid7
from ai_inference.ingest import Disposition, TokenSource, anomaly_request, classify
from ai_inference.store import Result
from conftest import JWT_SECRET, multi_reading, reading

T0 = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def test_a_sensor_reading_decodes() -> None:
    env = reading("dev-1", 21.5, T0, traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")
    r = decode(json.dumps(env).encode(), None)
    assert isinstance(r, Reading)
    assert (r.device_id, r.event_time, str(r.event_id)) == ("dev-1", T0, env["event_id"])
    assert r.quantities == (Quantity("value", 21.5),) and r.legacy
    assert r.event_time_text == env["event_time"]
    assert r.traceparent == env["metadata"]["traceparent"]


def test_a_legacy_reading_is_keyed_by_its_metric() -> None:
    env = reading("dev-1", 0, T0, payload={"value": 3, "unit": "bar", "metric": "oil.pressure-2"})
    r = decode(json.dumps(env).encode(), None)
    assert isinstance(r, Reading) and r.legacy
    assert r.quantities == (Quantity("oil.pressure-2", 3.0),)


def test_a_multi_key_reading_decodes_into_one_quantity_per_key() -> None:
    env = multi_reading("dev-1", {"temperature": 21.5, "humidity": 40}, T0, units={"temperature": "c"})
    r = decode(json.dumps(env).encode(), None)
    assert isinstance(r, Reading) and not r.legacy
    assert r.quantities == (Quantity("temperature", 21.5), Quantity("humidity", 40.0))
    assert all(isinstance(q.value, float) for q in r.quantities)
    # Units are optional, and 32 keys of 64 characters are accepted.
    many = {f"k{i:02d}" + "x" * 61: float(i) for i in range(32)}
    r = decode(json.dumps(multi_reading("dev-1", many, T0)).encode(), None)
    assert isinstance(r, Reading) and [q.key for q in r.quantities] == list(many)


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


def _payload(payload: dict[str, object]) -> bytes:
    return json.dumps(reading("dev-1", None, T0, payload=payload)).encode()


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        # Both shapes at once.
        (
            _payload({"value": 1, "unit": "c", "values": {"a": 1}}),
            "payload must have value or values, not both",
        ),
        (_payload({"value": 1, "values": {"a": 1}}), "not both"),
        # Legacy: unit and metric as the platform checks them.
        (_payload({"value": 1}), "payload.unit must be a non-empty string"),
        (_payload({"value": 1, "unit": " "}), "payload.unit must be a non-empty string"),
        (_payload({"value": 1, "unit": "c", "metric": ""}), "payload.metric must be an identifier"),
        (_payload({"value": 1, "unit": "c", "metric": "9lives"}), "payload.metric must be an identifier"),
        (_payload({"value": 1, "unit": "c", "metric": None}), "payload.metric must be an identifier"),
        (_payload({"value": 1, "unit": "c", "metric": "a" * 65}), "payload.metric must be an identifier"),
        (_payload({"unit": "c"}), "payload.value must be a finite number"),
        # values: an object of 1 to 32 finite numbers under identifier keys.
        (_payload({"values": {}}), "payload.values must be an object of 1 to 32 entries"),
        (_payload({"values": [1, 2]}), "payload.values must be an object of 1 to 32 entries"),
        (_payload({"values": None}), "payload.values must be an object"),
        (_payload({"values": {f"k{i}": 1 for i in range(33)}}), "1 to 32 entries"),
        (_payload({"values": {"temperature": "21"}}), "payload.values.temperature must be a finite number"),
        (_payload({"values": {"temperature": True}}), "payload.values.temperature must be a finite number"),
        (_payload({"values": {"temperature": None}}), "payload.values.temperature must be a finite number"),
        (
            _payload({"values": {"temperature": 10**400}}),
            "payload.values.temperature must be a finite number",
        ),
        (_payload({"values": {"_t": 1}}), "payload.values must have keys that are an identifier"),
        (_payload({"values": {"t t": 1}}), "payload.values must have keys that are an identifier"),
        (_payload({"values": {"t\n": 1}}), "payload.values must have keys that are an identifier"),
        (_payload({"values": {"t\u00e9": 1}}), "payload.values must have keys that are an identifier"),
        (_payload({"values": {"a" * 65: 1}}), "payload.values must have keys that are an identifier"),
        # units: optional, but only for keys of values, and non-empty.
        (_payload({"values": {"t": 1}, "units": "c"}), "payload.units must be an object"),
        (
            _payload({"values": {"t": 1}, "units": {"h": "%"}}),
            "payload.units must have keys of payload.values",
        ),
        (_payload({"values": {"t": 1}, "units": {"t": ""}}), "payload.units.t must be a non-empty string"),
        (_payload({"values": {"t": 1}, "units": {"t": 3}}), "payload.units.t must be a non-empty string"),
    ],
)
def test_a_reading_of_neither_shape_is_poison(raw: bytes, says: str) -> None:
    with pytest.raises(Poison, match="^sensor.reading ") as e:
        decode(raw, None)
    assert says in str(e.value)


def test_a_refusal_names_every_problem_but_never_a_bad_key() -> None:
    with pytest.raises(Poison) as e:
        decode(_payload({"values": {"a": "x", "b": None, "bad\u0000key": 1}, "units": {"a": ""}}), None)
    msg = str(e.value)
    assert "payload.values.a must be" in msg and "payload.values.b must be" in msg
    assert "payload.units.a must be" in msg and "\x00" not in msg and "bad" not in msg
    # A payload with many bad entries is refused naming a few.
    with pytest.raises(Poison) as e:
        decode(_payload({"values": {f"k{i}": "x" for i in range(20)}}), None)
    assert str(e.value).count("must be a finite number") == 5 and "and 15 more" in str(e.value)
    # Today's wording for a bad legacy value, unchanged.
    with pytest.raises(Poison) as e:
        decode(_payload({"value": "hot", "unit": "celsius"}), None)
    assert str(e.value) == "sensor.reading payload.value must be a finite number"


def test_the_anomaly_id_is_deterministic_and_a_v7() -> None:
    source = uuid7()
    a = anomaly_event_id(source, T0)
    assert a == anomaly_event_id(source, T0)
    assert a != anomaly_event_id(uuid7(), T0)
    assert a.version == 7 and a.variant == uuid.RFC_4122
    assert int.from_bytes(a.bytes[:6], "big") == int(T0.timestamp() * 1000)


def test_the_anomaly_id_is_distinct_per_key_and_unchanged_for_the_default_key() -> None:
    source = uuid7()
    # The derivation from before keys existed, spelled out: key "value" keeps it.
    before = _v7(
        int(T0.timestamp() * 1000),
        hashlib.sha256(b"cornjacket/ai-inference/ai.anomaly/v1\x00" + source.bytes).digest(),
    )
    assert anomaly_event_id(source, T0) == anomaly_event_id(source, T0, "value") == before
    ids = {anomaly_event_id(source, T0, k) for k in ("value", "temperature", "humidity", "humidit")}
    assert len(ids) == 4
    assert anomaly_event_id(source, T0, "humidity") == anomaly_event_id(source, T0, "humidity")
    assert all(
        i.version == 7 and int.from_bytes(i.bytes[:6], "big") == int(T0.timestamp() * 1000) for i in ids
    )


def test_the_anomaly_event_carries_the_key() -> None:
    env = multi_reading("dev-1", {"temperature": 21.5, "humidity": 99.5}, T0)
    r = decode(json.dumps(env).encode(), None)
    assert isinstance(r, Reading)
    result = Result(r, "humidity", 99.5, 12.5, True, "river-welford-zscore", "1", new=True)
    assert anomaly_request(result, 4.0) == {
        "event_type": "ai.anomaly",
        "aggregate_id": "dev-1",
        "event_id": str(anomaly_event_id(r.event_id, T0, "humidity")),
        "event_time": env["event_time"],
        "payload": {
            "source_event_id": env["event_id"],
            "device_id": "dev-1",
            "key": "humidity",
            "value": 99.5,
            "score": 12.5,
            "threshold": 4.0,
            "model": "river-welford-zscore@1",
        },
    }


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
    assert claims["sub"] == "ai-inference" and claims["scope"] == "ingest:write ingest:ai"
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
