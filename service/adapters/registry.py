"""The adapter lifecycle (DESIGN.md "Adapter lifecycle"): the only code that changes an adapter's status.

Each transition runs in the caller's transaction with the row locked, is checked against the allowed moves,
and is written to ``adapter_events``. Operations that touch production or canary first take one transaction-level
advisory lock, so concurrent promotions run one after the other instead of racing (the partial unique indexes
would refuse a second production anyway). Publishing the change on Redis happens after commit, by the caller.
"""

from __future__ import annotations

import asyncio

import asyncpg

from service.adapters.files import AdapterFilesError, adapter_digest
from service.adapters.store import COLUMNS
from service.errors import Conflict, NotFound

REGISTRY_LOCK_ID = 0x466C7972  # serialises operations on the live adapters

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
                       extra={"current_status": current["status"]})
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


async def _live(conn: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", REGISTRY_LOCK_ID)
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM adapters WHERE status IN ('production', 'canary') FOR UPDATE")
    return {row["status"]: row for row in rows}


async def _check_files(conn: asyncpg.Connection, version: int) -> None:
    """Refuse to put an adapter live whose files are gone or changed: every process would refuse to load it."""
    row = await conn.fetchrow("SELECT status, path, sha256 FROM adapters WHERE version = $1", version)
    if row is None or not row["path"]:
        return  # transition() answers 404 or the status conflict
    try:
        sha256, _ = await asyncio.to_thread(adapter_digest, row["path"])
    except AdapterFilesError as exc:
        raise Conflict(f"adapter v{version} cannot be served: {exc}",
                       extra={"current_status": row["status"]}) from exc
    if sha256 != row["sha256"]:
        raise Conflict(f"adapter v{version} cannot be served: its files at {row['path']} fail their checksum "
                       "(changed or corrupt since registration)", extra={"current_status": row["status"]})


async def promote(conn: asyncpg.Connection, version: int, *, actor: str, reason: str | None) -> asyncpg.Record:
    """Make ``version`` production; the current production retires (it stays the rollback target)."""
    await _check_files(conn, version)  # before the lock: hashing a large adapter must not hold up other operations
    live = await _live(conn)
    current = live.get("production")
    if current is not None and current["version"] == version:
        raise Conflict(f"adapter v{version} is already production", extra={"current_status": "production"})
    target = await conn.fetchrow("SELECT status FROM adapters WHERE version = $1", version)
    if target is not None and "production" not in ALLOWED[target["status"]]:
        raise Conflict(f"adapter v{version} is {target['status']}; it cannot become production",
                       extra={"current_status": target["status"]})
    if current is not None:
        await transition(conn, current["version"], "retired", actor=actor, reason=f"replaced by v{version}")
    return await transition(conn, version, "production", actor=actor, reason=reason, canary_percent=None)


async def start_canary(conn: asyncpg.Connection, version: int, percent: int, *, actor: str,
                       reason: str | None) -> asyncpg.Record:
    await _check_files(conn, version)
    live = await _live(conn)
    if "canary" in live and live["canary"]["version"] != version:
        raise Conflict(f"v{live['canary']['version']} is in canary already; promote or reject it first",
                       extra={"current_status": "canary", "canary_version": live["canary"]["version"]})
    return await transition(conn, version, "canary", actor=actor, reason=reason, canary_percent=percent)


async def reject(conn: asyncpg.Connection, version: int, *, actor: str, reason: str | None) -> asyncpg.Record:
    await _live(conn)
    return await transition(conn, version, "rejected", actor=actor, reason=reason, canary_percent=None)


async def retire(conn: asyncpg.Connection, version: int, *, actor: str, reason: str | None) -> asyncpg.Record:
    await _live(conn)
    return await transition(conn, version, "retired", actor=actor, reason=reason)


async def rollback(conn: asyncpg.Connection, *, actor: str, reason: str | None) -> asyncpg.Record | None:
    """Production back to the version that was production before it (or to the base model when none was);
    the current one is marked rolled_back. Returns the new production row, None for the base."""
    live = await _live(conn)
    current = live.get("production")
    if current is None:
        raise Conflict("nothing to roll back: the base model is serving", extra={"current_status": None})
    previous = await conn.fetchrow(
        """SELECT e.version FROM adapter_events e JOIN adapters a ON a.version = e.version
           WHERE e.to_status = 'production' AND e.version <> $1 AND a.status = 'retired'
           ORDER BY e.id DESC LIMIT 1""", current["version"])
    await transition(conn, current["version"], "rolled_back", actor=actor, reason=reason)
    if previous is None:
        return None
    return await transition(conn, previous["version"], "production", actor=actor,
                            reason=f"rollback from v{current['version']}")


OPERATIONS = ("promote", "canary", "reject", "retire", "rollback")


async def run_operation(conn: asyncpg.Connection, operation: str, version: int | None = None, *, actor: str,
                        reason: str | None = None, percent: int | None = None) -> asyncpg.Record | None:
    """One operator action by name, in the caller's transaction (the API and the CLI share it)."""
    if operation == "rollback":
        return await rollback(conn, actor=actor, reason=reason)
    if operation == "canary":
        return await start_canary(conn, version, percent, actor=actor, reason=reason)
    action = {"promote": promote, "reject": reject, "retire": retire}[operation]
    return await action(conn, version, actor=actor, reason=reason)
