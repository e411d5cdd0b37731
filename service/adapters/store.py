"""SQL for adapters. Status changes belong to the registry's state machine; this module only reads and inserts."""

from __future__ import annotations

import asyncpg

Conn = asyncpg.Connection | asyncpg.Pool

COLUMNS = ("version, name, base_model, parent_version, algorithm, status, canary_percent, path, sha256, size_bytes, "
           "metrics, run_id, created_at, updated_at")
# Statuses whose files may be served when a client pins the version (operators try candidates this way).
SERVABLE = ("candidate", "canary", "production", "retired", "rolled_back")


async def get(conn: Conn, version: int):
    return await conn.fetchrow(f"SELECT {COLUMNS} FROM adapters WHERE version = $1", version)


async def get_by_name(conn: Conn, name: str):
    return await conn.fetchrow(f"SELECT {COLUMNS} FROM adapters WHERE name = $1", name)


async def live(conn: Conn):
    """The production and canary adapters (at most one each)."""
    return await conn.fetch(f"SELECT {COLUMNS} FROM adapters WHERE status IN ('production', 'canary')")


async def insert_candidate(conn: asyncpg.Connection, *, name: str, base_model: str, path: str, sha256: str,
                           size_bytes: int, algorithm: str = "import", actor: str, reason: str):
    """Register files that already exist on disk as a candidate, with its audit event (call in a transaction)."""
    row = await conn.fetchrow(
        f"""INSERT INTO adapters (name, base_model, algorithm, status, path, sha256, size_bytes)
            VALUES ($1, $2, $3, 'candidate', $4, $5, $6) RETURNING {COLUMNS}""",
        name, base_model, algorithm, path, sha256, size_bytes)
    await conn.execute("INSERT INTO adapter_events (version, from_status, to_status, actor, reason) "
                       "VALUES ($1, NULL, 'candidate', $2, $3)", row["version"], actor, reason)
    return row

