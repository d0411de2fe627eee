"""PostgreSQL connections and the `ai` schema's migrations (SPEC §4, ADR-0016)."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
SCHEMA = "ai"
# Any fixed 64-bit key works; this one spells "cj_ai_mg". Shared by every instance of the sidecar.
MIGRATION_LOCK_KEY = 0x636A5F61695F6D67
_MIGRATION_RE = re.compile(r"^V(\d+)__(\w+)\.sql$")

# Keepalives and a TCP user timeout make a connection whose peer vanished fail within seconds
# instead of hanging in a read forever, so the consumer notices an outage and retries.
CONNECT_OPTIONS: dict[str, object] = {
    "connect_timeout": 3,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    "application_name": "ai-inference",
}

# Errors that mean "the database is not reachable right now" rather than "this data is bad".
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (psycopg.OperationalError, psycopg.InterfaceError)


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=autocommit, **CONNECT_OPTIONS)  # type: ignore[arg-type]


async def aconnect(url: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(url, autocommit=True, **CONNECT_OPTIONS)  # type: ignore[arg-type]


class MigrationError(Exception):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: dict[int, Migration] = {}
    for path in directory.glob("*.sql"):
        m = _MIGRATION_RE.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named V<number>__<name>.sql")
        version = int(m.group(1))
        if version in found:
            raise MigrationError(f"two migrations have version {version}")
        found[version] = Migration(version, m.group(2), path.read_text())
    return [found[v] for v in sorted(found)]


def migrate(url: str, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Applies pending migrations in version order; returns the versions applied.

    A session advisory lock serialises instances starting together (even `CREATE SCHEMA IF NOT
    EXISTS` races otherwise); each migration commits together with its history row.
    """
    migrations = discover(directory)
    applied: list[int] = []
    with connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            conn.execute(
                f"""CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_history (
                        version    integer     PRIMARY KEY,
                        name       text        NOT NULL,
                        checksum   text        NOT NULL,
                        applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {v: c for v, c in conn.execute(f"SELECT version, checksum FROM {SCHEMA}.schema_history")}
            for m in migrations:
                if m.version in done:
                    if done[m.version] != m.checksum:
                        raise MigrationError(
                            f"migration V{m.version}__{m.name} was changed after it was applied"
                        )
                    continue
                with conn.transaction():
                    conn.execute(m.sql.encode())
                    conn.execute(
                        f"INSERT INTO {SCHEMA}.schema_history (version, name, checksum) VALUES (%s, %s, %s)",
                        (m.version, m.name, m.checksum),
                    )
                log.info("Migration applied.", extra={"version": m.version, "migration": m.name})
                applied.append(m.version)
            unknown = sorted(set(done) - {m.version for m in migrations})
            if unknown:
                # A newer instance migrated further: this one's code may not fit the schema.
                raise MigrationError(f"the database has migrations this build lacks: {unknown}")
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied


def migrate_with_retry(url: str, deadline_s: float = 60.0) -> list[int]:
    """`migrate`, waiting for a database that is still starting (outages only, up to the deadline)."""
    end = time.monotonic() + deadline_s
    delay = 0.5
    while True:
        try:
            return migrate(url)
        except OUTAGE_ERRORS as e:
            if time.monotonic() + delay > end:
                raise
            log.warning(
                "Database unavailable; retrying migrations.", extra={"error": str(e), "retry_in_s": delay}
            )
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
