"""SQL for feedback and key flags. A comparison is stored on the parent of the compared siblings, so the database
itself keeps one choice per owner among one set of answers."""

from __future__ import annotations

import uuid

import asyncpg

Conn = asyncpg.Connection | asyncpg.Pool
COLUMNS = ("id, message_id, owner, kind, value, content, preferred_message_id, comment, tags, created_at, updated_at, "
           "retracted_at")


async def upsert(conn: Conn, *, message_id: uuid.UUID, owner: int, kind: str, value: int | None = None,
                 content: str | None = None, preferred_message_id: uuid.UUID | None = None,
                 comment: str | None = None, tags: list[str] | None = None) -> tuple[asyncpg.Record, bool]:
    """(the row, True if it is new): a second vote of the same kind replaces the first, a retracted one revives."""
    row = await conn.fetchrow(
        f"""INSERT INTO feedback (message_id, owner, kind, value, content, preferred_message_id, comment, tags)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
            ON CONFLICT (message_id, owner, kind) DO UPDATE SET
                value = excluded.value, content = excluded.content,
                preferred_message_id = excluded.preferred_message_id, comment = excluded.comment,
                tags = excluded.tags, updated_at = now(), retracted_at = NULL
            RETURNING {COLUMNS}, (xmax = 0) AS inserted""",
        message_id, owner, kind, value, content, preferred_message_id, comment, tags or [])
    return row, row["inserted"]


async def retract(conn: Conn, *, message_ids: list[uuid.UUID], owner: int, kinds: list[str]) -> int:
    status = await conn.execute(
        "UPDATE feedback SET retracted_at = now(), updated_at = now() WHERE message_id = ANY($1::uuid[]) "
        "AND owner = $2 AND kind = ANY($3::text[]) AND retracted_at IS NULL", message_ids, owner, kinds)
    return int(status.split()[-1])


async def for_message(conn: Conn, *, message_id: uuid.UUID, parent_id: uuid.UUID | None, owner: int):
    """The owner's live feedback on a message, and their choice among it and its siblings."""
    return await conn.fetch(
        f"""SELECT {COLUMNS} FROM feedback
            WHERE owner = $3 AND retracted_at IS NULL
              AND (message_id = $1 OR (kind = 'comparison' AND message_id = $2))
            ORDER BY kind""", message_id, parent_id, owner)


async def sibling_ids(conn: Conn, parent_id: uuid.UUID) -> set[uuid.UUID]:
    rows = await conn.fetch("SELECT id FROM messages WHERE parent_id = $1 AND role = 'assistant'", parent_id)
    return {r["id"] for r in rows}


async def set_flag(conn: Conn, key_id: int, reason: str | None, flagged: bool) -> bool:
    if flagged:
        status = await conn.execute("UPDATE api_keys SET flagged_at = coalesce(flagged_at, now()), flag_reason = $2 "
                                    "WHERE id = $1", key_id, reason)
    else:
        status = await conn.execute("UPDATE api_keys SET flagged_at = NULL, flag_reason = NULL WHERE id = $1",
                                    key_id)
    return status.endswith(" 1")
