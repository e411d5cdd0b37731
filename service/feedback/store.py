"""SQL for feedback and key flags. A comparison is stored on the parent of the compared siblings, so the database
itself keeps one choice per owner among one set of answers."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import asyncpg

Conn = asyncpg.Connection | asyncpg.Pool
COLUMNS = ("id, message_id, owner, kind, value, content, preferred_message_id, comment, tags, created_at, updated_at, "
           "retracted_at")


@dataclass(frozen=True)
class Write:
    """One caller's feedback of one kind, to be stored on ``message_id`` (the rated reply itself, or the parent of
    the compared siblings) if ``rated_id`` is an assistant reply the owner may see."""

    rated_id: uuid.UUID
    message_id: uuid.UUID
    owner: int
    sees_everyone: bool
    kind: str
    value: int | None = None
    content: str | None = None
    preferred_message_id: uuid.UUID | None = None
    comment: str | None = None
    tags: tuple[str, ...] = ()

    @property
    def row_key(self) -> tuple[uuid.UUID, int, str]:
        """The feedback row it replaces: one per (message, owner, kind)."""
        return self.message_id, self.owner, self.kind


@dataclass(frozen=True)
class Saved:
    """What ``save`` found and did for one Write: ``role`` is None when the rated message does not exist; ``row`` is
    None when the message was not the caller's to rate (not visible, or not an assistant reply) and nothing was
    written."""

    role: str | None
    visible: bool
    row: asyncpg.Record | None

    @property
    def created(self) -> bool:
        return bool(self.row and self.row["inserted"])


async def save(conn: Conn, writes: list[Write]) -> list[Saved]:
    """Upsert each write whose rated message the owner may rate, all in one statement and one transaction; the
    results are in the order of ``writes``, whose row keys must be distinct.

    The visibility check travels with the write, so the two cannot be split by a concurrent delete. A second vote of
    the same kind replaces the first and a retracted one revives. Rows are written in row-key order, so concurrent
    statements lock shared rows in one order and cannot deadlock each other.
    """
    found = await conn.fetch(
        f"""WITH input AS (
                SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::boolean[], $5::text[], $6::smallint[],
                                     $7::text[], $8::uuid[], $9::text[], $10::text[]) WITH ORDINALITY
                    AS i(rated_id, message_id, owner, sees_everyone, kind, value, content, preferred_message_id,
                         comment, tags, n)
            ), rated AS (
                SELECT i.*, m.role, (c.deleted_at IS NULL AND (c.owner = i.owner OR i.sees_everyone)) AS visible
                FROM input i LEFT JOIN messages m ON m.id = i.rated_id
                             LEFT JOIN conversations c ON c.id = m.conversation_id
            ), saved AS (
                INSERT INTO feedback (message_id, owner, kind, value, content, preferred_message_id, comment, tags)
                SELECT message_id, owner, kind, value, content, preferred_message_id, comment,
                       ARRAY(SELECT jsonb_array_elements_text(tags::jsonb))
                FROM rated WHERE visible AND role = 'assistant'
                ORDER BY message_id, owner, kind
                ON CONFLICT (message_id, owner, kind) DO UPDATE SET
                    value = excluded.value, content = excluded.content,
                    preferred_message_id = excluded.preferred_message_id, comment = excluded.comment,
                    tags = excluded.tags, updated_at = now(), retracted_at = NULL
                RETURNING {COLUMNS}, (xmax = 0) AS inserted
            )
            SELECT r.role AS rated_role, coalesce(r.visible, false) AS rated_visible, s.*
            FROM rated r LEFT JOIN saved s ON (s.message_id, s.owner, s.kind) = (r.message_id, r.owner, r.kind)
            ORDER BY r.n""",
        [w.rated_id for w in writes], [w.message_id for w in writes], [w.owner for w in writes],
        [w.sees_everyone for w in writes], [w.kind for w in writes], [w.value for w in writes],
        [w.content for w in writes], [w.preferred_message_id for w in writes], [w.comment for w in writes],
        [json.dumps(w.tags) for w in writes])  # a JSON list each: arrays of arrays must be rectangular
    return [Saved(r["rated_role"], r["rated_visible"], r if r["id"] is not None else None) for r in found]


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
