"""Configuration from `CJ_*` environment variables (SPEC §3).

Read and validated once at startup: a bad value stops the process with a message that names the
variable and the expected form, never a stack trace or a silent default.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_DATABASE_URL = "postgres://cornjacket:cornjacket@localhost:5432/cornjacket?sslmode=disable"
SERVICE_NAME = "ai-inference"
SENSOR_TOPIC = "sensor-events"

# Levels the Rust services accept in CJ_LOG_LEVEL, mapped to Python's.
_LEVELS = {
    "trace": "DEBUG",
    "debug": "DEBUG",
    "info": "INFO",
    "warn": "WARNING",
    "warning": "WARNING",
    "error": "ERROR",
    "off": "CRITICAL",
}
_DURATION_RE = re.compile(r"^(\d+)(ms|s|m|h|d)?$")
_DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class ConfigError(Exception):
    """A configuration problem, worded for the operator."""


class Settings(BaseSettings):
    """Every setting the sidecar reads; field aliases are the environment variable names."""

    # Like the platform binary, a .env in the working directory is read; the environment wins.
    model_config = SettingsConfigDict(
        case_sensitive=True, env_ignore_empty=True, extra="ignore", env_file=".env"
    )

    database_url: str = Field(
        DEFAULT_DATABASE_URL, validation_alias=AliasChoices("CJ_AI_DATABASE_URL", "CJ_DATABASE_URL")
    )
    kafka_brokers: str = Field(
        "localhost:9092", validation_alias=AliasChoices("CJ_KAFKA_BROKERS", "CJ_REDPANDA_BROKERS")
    )
    topic_prefix: str = Field("", validation_alias="CJ_KAFKA_TOPIC_PREFIX")
    kafka_partitions: int = Field(3, ge=1, le=1024, validation_alias="CJ_KAFKA_PARTITIONS")
    kafka_retention_ms: int = Field("24h", validation_alias="CJ_KAFKA_RETENTION")
    consumer_group: str = Field(SERVICE_NAME, min_length=1, validation_alias="CJ_AI_CONSUMER_GROUP")
    session_timeout_ms: int = Field(10_000, ge=1_000, le=300_000, validation_alias="CJ_AI_SESSION_TIMEOUT_MS")
    # How often the DLQ replay worker looks for rows `cornjacket dlq replay` marked 'replaying'.
    dlq_replay_interval_ms: int = Field(
        1000, ge=10, le=3_600_000, validation_alias="CJ_AI_DLQ_REPLAY_INTERVAL_MS"
    )
    # Shared with the platform: Tansu answers a fetch only when this expires.
    fetch_wait_max_ms: int = Field(10, ge=1, le=10_000, validation_alias="CJ_KAFKA_FETCH_WAIT_MAX_MS")
    # The platform's retention settings (SPEC §13): results are kept like sensor readings.
    retention_ms: int = Field("7d", validation_alias="CJ_RETENTION_TIMESERIES")
    retention_interval_ms: int = Field("1h", validation_alias="CJ_RETENTION_INTERVAL")
    retention_enabled: bool = Field(True, validation_alias="CJ_RETENTION_ENABLED")
    port: int = Field(8090, ge=1, le=65535, validation_alias="CJ_AI_PORT")
    bind_addr: str = Field("127.0.0.1", validation_alias="CJ_BIND_ADDR")
    ingest_url: str = Field("http://127.0.0.1:8080", validation_alias="CJ_AI_INGEST_URL")
    ingest_token: SecretStr | None = Field(None, validation_alias="CJ_AI_INGEST_TOKEN")
    jwt_secret: SecretStr | None = Field(None, validation_alias="CJ_JWT_SECRET")
    jwt_issuer: str | None = Field(None, validation_alias="CJ_JWT_ISSUER")
    jwt_audience: str | None = Field(None, validation_alias="CJ_JWT_AUDIENCE")
    threshold: float = Field(4.0, gt=0, le=1e6, allow_inf_nan=False, validation_alias="CJ_AI_THRESHOLD")
    warmup: int = Field(30, ge=2, le=1_000_000, validation_alias="CJ_AI_WARMUP")
    horizon: int = Field(1000, ge=2, le=100_000_000, validation_alias="CJ_AI_HORIZON")
    log_level: str = Field("info", validation_alias="CJ_LOG_LEVEL")
    log_format: str = Field("json", validation_alias="CJ_LOG_FORMAT")

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
            raise ValueError("must be a URL such as postgres://user:password@host:5432/dbname")
        return v

    @field_validator("kafka_brokers")
    @classmethod
    def _brokers(cls, v: str) -> str:
        brokers = [b.strip() for b in v.split(",") if b.strip()]
        if not brokers or any(not re.fullmatch(r"[^\s:]+:\d{1,5}", b) for b in brokers):
            raise ValueError("must be a comma-separated list of host:port")
        return ",".join(brokers)

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]*", v):
            raise ValueError("may contain only letters, digits, '.', '_' and '-'")
        return v

    @field_validator("retention_ms", "retention_interval_ms", mode="before")
    @classmethod
    def _window(cls, v: Any) -> int:
        m = _DURATION_RE.fullmatch(str(v).strip())
        if not m or int(m.group(1)) == 0:
            raise ValueError("must be a positive duration such as 7d, 24h, 30m or 3600s")
        return int(m.group(1)) * _DURATION_UNITS_MS[m.group(2) or "s"]

    @field_validator("kafka_retention_ms", mode="before")
    @classmethod
    def _retention(cls, v: Any) -> int:
        m = _DURATION_RE.fullmatch(str(v).strip())
        if not m:
            raise ValueError("must be a duration such as 24h, 30m, 3600s or 500ms")
        return int(m.group(1)) * _DURATION_UNITS_MS[m.group(2) or "s"]

    @field_validator("bind_addr")
    @classmethod
    def _bind(cls, v: str) -> str:
        if v == "localhost":
            return v
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError("must be an IP address such as 127.0.0.1 or 0.0.0.0") from None
        return v

    @field_validator("ingest_url")
    @classmethod
    def _ingest_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8080")
        return v.rstrip("/")

    @field_validator("jwt_secret")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        # The Rust services take an EnvFilter ("info,cornjacket=debug"): its bare level applies here.
        bare = [d.strip().lower() for d in v.split(",") if d.strip() and "=" not in d]
        level = bare[-1] if bare else "info"
        if level not in _LEVELS:
            raise ValueError("must be one of trace, debug, info, warn, error, off")
        return _LEVELS[level]

    @field_validator("log_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v.lower() not in ("json", "text"):
            raise ValueError("must be json or text")
        return v.lower()

    @property
    def sensor_topic(self) -> str:
        return f"{self.topic_prefix}{SENSOR_TOPIC}"


class _MappingSettings(Settings):
    """Settings from an explicit mapping only: no process environment, no .env (for tests)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


# Field name → the variable an operator sets (the first alias is the one named in errors).
def _variable(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return str(alias)


_SECRET_FIELDS = {"ingest_token", "jwt_secret", "database_url"}


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `env` (the process environment when None); `ConfigError` names each bad variable."""
    try:
        if env is None:
            return Settings()
        # Keys are variable names (the aliases), which the typed signature cannot express.
        return _MappingSettings(**{k: v for k, v in env.items() if v != ""})  # type: ignore[arg-type]
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = str(err["loc"][0]) if err["loc"] else ""
            field = next(
                (f for f in Settings.model_fields if f == loc or _variable(f) == loc or _aliases(f, loc)),
                None,
            )
            name = _variable(field) if field else loc
            msg = str(err["msg"]).removeprefix("Value error, ")
            shown = "" if field in _SECRET_FIELDS else f" (got {err.get('input')!r})"
            problems.append(f"{name}: {msg}{shown}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


def _aliases(field: str, loc: str) -> bool:
    alias = Settings.model_fields[field].validation_alias
    return isinstance(alias, AliasChoices) and loc in alias.choices
