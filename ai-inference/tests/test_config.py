"""Configuration: defaults, fallbacks, and startup errors that name the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ai_inference.config import DEFAULT_DATABASE_URL, ConfigError, load_settings
from conftest import AI_DIR, base_env


def test_defaults() -> None:
    s = load_settings({})
    assert s.database_url == DEFAULT_DATABASE_URL
    assert s.kafka_brokers == "localhost:9092"
    assert s.sensor_topic == "sensor-events"
    assert s.consumer_group == "ai-inference"
    assert (s.bind_addr, s.port) == ("127.0.0.1", 8090)
    assert s.ingest_url == "http://127.0.0.1:8080"
    assert s.ingest_token is None and s.jwt_secret is None
    assert (s.threshold, s.warmup) == (4.0, 30)
    assert s.kafka_retention_ms == 86_400_000
    assert (s.log_level, s.log_format) == ("INFO", "json")
    assert (s.retention_ms, s.retention_interval_ms, s.retention_enabled) == (604_800_000, 3_600_000, True)
    assert s.dlq_replay_interval_ms == 1000


def test_database_url_falls_back_to_the_shared_one() -> None:
    shared = "postgres://u:p@db:5432/shared"
    own = "postgres://u:p@db:5432/ai"
    assert load_settings({"CJ_DATABASE_URL": shared}).database_url == shared
    assert load_settings({"CJ_DATABASE_URL": shared, "CJ_AI_DATABASE_URL": own}).database_url == own


def test_values_are_parsed() -> None:
    s = load_settings(
        {
            "CJ_KAFKA_TOPIC_PREFIX": "t1.",
            "CJ_KAFKA_BROKERS": "a:9092, b:9093",
            "CJ_KAFKA_RETENTION": "2h",
            "CJ_AI_INGEST_URL": "http://gw:80/",
            "CJ_AI_THRESHOLD": "5.5",
            "CJ_AI_WARMUP": "10",
            "CJ_LOG_LEVEL": "warn,cornjacket=debug",
            "CJ_LOG_FORMAT": "TEXT",
            "CJ_AI_INGEST_TOKEN": "",  # empty means unset
            "CJ_RETENTION_TIMESERIES": "30d",
            "CJ_RETENTION_ENABLED": "false",
        }
    )
    assert (s.retention_ms, s.retention_enabled) == (30 * 86_400_000, False)
    assert s.sensor_topic == "t1.sensor-events"
    assert s.kafka_brokers == "a:9092,b:9093"
    assert s.kafka_retention_ms == 7_200_000
    assert s.ingest_url == "http://gw:80"
    assert (s.threshold, s.warmup) == (5.5, 10)
    assert (s.log_level, s.log_format) == ("WARNING", "text")
    assert s.ingest_token is None


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CJ_AI_PORT", "http"),
        ("CJ_AI_PORT", "70000"),
        ("CJ_AI_DATABASE_URL", "mysql://x/y"),
        ("CJ_DATABASE_URL", "not a url"),
        ("CJ_KAFKA_BROKERS", "no-port"),
        ("CJ_KAFKA_TOPIC_PREFIX", "bad prefix"),
        ("CJ_KAFKA_RETENTION", "one week"),
        ("CJ_RETENTION_TIMESERIES", "0s"),
        ("CJ_RETENTION_INTERVAL", "hourly"),
        ("CJ_RETENTION_ENABLED", "perhaps"),
        ("CJ_BIND_ADDR", "everywhere"),
        ("CJ_AI_INGEST_URL", "ftp://x"),
        ("CJ_AI_THRESHOLD", "-1"),
        ("CJ_AI_THRESHOLD", "nan"),
        ("CJ_AI_THRESHOLD", "inf"),
        ("CJ_AI_WARMUP", "1"),
        ("CJ_AI_WARMUP", "ten"),
        ("CJ_AI_DLQ_REPLAY_INTERVAL_MS", "0"),
        ("CJ_AI_DLQ_REPLAY_INTERVAL_MS", "soon"),
        ("CJ_JWT_SECRET", "too-short"),
        ("CJ_LOG_LEVEL", "loud"),
        ("CJ_LOG_FORMAT", "xml"),
    ],
)
def test_a_bad_value_names_its_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings({var: value})
    # The variable an operator set (CJ_DATABASE_URL is reported as the sidecar's own name).
    assert ("CJ_AI_DATABASE_URL" if var == "CJ_DATABASE_URL" else var) in str(e.value)


def test_secrets_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as e:
        load_settings({"CJ_JWT_SECRET": "hunter2-too-short"})
    assert "hunter2" not in str(e.value)


def test_the_process_refuses_to_start_on_a_bad_value() -> None:
    env = base_env() | {"PYTHONPATH": str(AI_DIR), "CJ_AI_PORT": "eighty"}
    r = subprocess.run(
        [sys.executable, "-m", "ai_inference"],
        env=env,
        cwd=AI_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "CJ_AI_PORT" in r.stderr


def test_the_environment_and_a_dot_env_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("CJ_")]:
        monkeypatch.delenv(k)
    (tmp_path / ".env").write_text("CJ_AI_PORT=7777\nCJ_AI_WARMUP=12\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CJ_AI_WARMUP", "50")  # the environment wins over .env
    s = load_settings()
    assert (s.port, s.warmup) == (7777, 50)
