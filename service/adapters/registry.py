"""The adapter lifecycle (DESIGN.md "Adapter lifecycle"): the only code that changes an adapter's status.

Each transition runs in the caller's transaction with the row locked, is checked against the allowed moves,
and is written to ``adapter_events``. Publishing the change on Redis happens after commit, by the caller.
"""

from __future__ import annotations

import asyncpg

from service.adapters.store import COLUMNS
from service.errors import Conflict, NotFound

ALLOWED = {
    "training": {"candidate", "rejected", "failed"},
    "candidate": {"canary", "production", "rejected", "retired"},
    "canary": {"production", "rejected", "candidate"},
    "production": {"retired", "rolled_back"},
    "retired": {"production"},
    "rolled_back": {"production", "retired"},
    "rejected": set(),
    "failed": set(),
}


async def create_training(conn: asyncpg.Connection, *, base_model: str, algorithm: str, run_id: int,
                          parent_version: int | None, actor: str):
    """A row for an adapter being trained: it has a version but no files, so nothing can serve it yet."""
    row = await conn.fetchrow(
        f"""INSERT INTO adapters (name, base_model, parent_version, algorithm, status, run_id)
            VALUES ('run-' || $1::bigint, $2, $3, $4, 'training', $1::bigint) RETURNING {COLUMNS}""",
        run_id, base_model, parent_version, algorithm)
    await conn.execute("INSERT INTO adapter_events (version, from_status, to_status, actor, reason) "
                       "VALUES ($1, NULL, 'training', $2, $3)", row["version"], actor, f"training run {run_id}")
    return row


async def transition(conn: asyncpg.Connection, version: int, to_status: str, *, actor: str, reason: str | None,
                     **updates) -> asyncpg.Record:
    """Move ``version`` to ``to_status`` (with column ``updates``) in the caller's transaction; 404/409 otherwise."""
    current = await conn.fetchrow("SELECT status FROM adapters WHERE version = $1 FOR UPDATE", version)
    if current is None:
        raise NotFound(f"no adapter version {version}", field="version")
    if to_status not in ALLOWED[current["status"]]:
        raise Conflict(f"adapter v{version} is {current['status']}; it cannot become {to_status}",
                       extra={"status": current["status"]})
    columns = ["status = $2", "updated_at = now()"]
    values: list = [version, to_status]
    for name, value in updates.items():
        values.append(value)
        columns.append(f"{name} = ${len(values)}")
    row = await conn.fetchrow(f"UPDATE adapters SET {', '.join(columns)} WHERE version = $1 RETURNING {COLUMNS}",
                              *values)
    await conn.execute("INSERT INTO adapter_events (version, from_status, to_status, actor, reason) "
                       "VALUES ($1, $2, $3, $4, $5)", version, current["status"], to_status, actor, reason)
    return row
