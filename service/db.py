"""Postgres access: the asyncpg pool, database creation and the schema migrations.

Migrations are the ordered files ``service/migrations/NNNN_name.sql``. Each runs in its own transaction and is
recorded in ``schema_migrations`` with its checksum, under an advisory lock so that replicas starting together
apply each migration once. Applying twice is a no-op; an applied file that was edited afterwards is an error.
This module knows nothing about what the tables mean.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

MIGRATION_LOCK_ID = 0x466C7977  # "Flyw": one advisory lock key for every process that migrates
_MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The migration files shipped in the package, in order; a gap or a duplicate number is a packaging bug."""
    found = []
    for entry in resources.files("service.migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..N without gaps, found {[m.version for m in found]}")
    return found


class MigrationError(RuntimeError):
    pass


async def migrate(conn: asyncpg.Connection, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply pending migrations; return those applied now (empty when the schema is current)."""
    migrations = load_migrations() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}
        newer = sorted(set(applied) - {m.version for m in migrations})
        if newer:
            raise MigrationError(
                f"the database has migration {newer[-1]} which this Flywheel does not know: upgrade Flywheel"
            )
        done = []
        for migration in migrations:
            row = applied.get(migration.version)
            if row is not None:
                if row["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed after it was applied; "
                        "add a new migration instead of editing an applied one"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
            log.info("applied migration %04d_%s", migration.version, migration.name)
            done.append(migration)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)


async def schema_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations") if exists else 0


async def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it does not exist (connecting to ``postgres``); True if created."""
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        await admin.execute('CREATE DATABASE "{}"'.format(name.replace('"', '""')))
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # another process created it meanwhile (racing CREATEs can also trip pg_database's unique index)
        return False
    finally:
        await admin.close()
    log.info("created database %s", name)
    return True


async def init_connection(conn: asyncpg.Connection) -> None:
    """json and jsonb columns read and write Python values."""
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without the reset query: we never SET, LISTEN or hold advisory locks on pooled connections, and
    asyncpg still rolls back an open transaction. Saves a round trip per request."""


async def create_pool(url: str, size: int) -> asyncpg.Pool:
    """A pool whose connections speak JSON for json/jsonb columns."""
    return await asyncpg.create_pool(url, min_size=1, max_size=size, init=init_connection, reset=_keep_session)
