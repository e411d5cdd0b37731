"""SQL for conversations and messages. Visibility rules live in the service; this module only reads and writes."""

from __future__ import annotations

import uuid

import asyncpg

Conn = asyncpg.Connection | asyncpg.Pool

MESSAGE_COLUMNS = ("id, conversation_id, parent_id, role, content, created_at, adapter_version, model, sampling, "
                   "finish_reason, prompt_tokens, completion_tokens, latency_ms")


async def create_conversation(conn: Conn, owner: int | None, title: str, conversation_id: uuid.UUID | None = None):
    return await conn.fetchrow(
        "INSERT INTO conversations (id, owner, title) VALUES (coalesce($1, gen_random_uuid()), $2, $3) "
        "RETURNING id, owner, title, created_at", conversation_id, owner, title)


async def list_conversations(conn: Conn, owner: int | None, limit: int, offset: int):
    return await conn.fetch(
        "SELECT id, owner, title, created_at FROM conversations WHERE owner IS NOT DISTINCT FROM $1 "
        "AND deleted_at IS NULL ORDER BY created_at DESC, id LIMIT $2 OFFSET $3", owner, limit, offset)


async def get_conversation(conn: Conn, conversation_id: uuid.UUID):
    return await conn.fetchrow(
        "SELECT id, owner, title, created_at, deleted_at FROM conversations WHERE id = $1", conversation_id)


async def delete_conversation(conn: Conn, conversation_id: uuid.UUID) -> None:
    await conn.execute("UPDATE conversations SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL",
                       conversation_id)


async def conversation_messages(conn: Conn, conversation_id: uuid.UUID):
    return await conn.fetch(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 "
                            "ORDER BY created_at, id", conversation_id)


async def latest_message(conn: Conn, conversation_id: uuid.UUID):
    return await conn.fetchrow(f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE conversation_id = $1 "
                               "ORDER BY created_at DESC, id DESC LIMIT 1", conversation_id)


async def get_message(conn: Conn, message_id: uuid.UUID):
    """The message with its conversation's owner and deletion time."""
    return await conn.fetchrow(
        f"SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}, c.owner, c.deleted_at "
        "FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.id = $1", message_id)


async def context_chain(conn: Conn, message_id: uuid.UUID):
    """The messages from the conversation's root down to ``message_id``, in order: what the model saw."""
    return await conn.fetch(
        f"""WITH RECURSIVE chain AS (
                SELECT {MESSAGE_COLUMNS}, 0 AS depth FROM messages WHERE id = $1
                UNION ALL
                SELECT {', '.join('m.' + c.strip() for c in MESSAGE_COLUMNS.split(','))}, chain.depth + 1
                FROM messages m JOIN chain ON m.id = chain.parent_id)
            SELECT * FROM chain ORDER BY depth DESC""", message_id)


async def insert_message(conn: Conn, *, conversation_id: uuid.UUID, role: str, content: str,
                         parent_id: uuid.UUID | None = None, message_id: uuid.UUID | None = None, **reply):
    """Insert one message; ``reply`` holds an assistant message's adapter_version, model, sampling, token counts."""
    return await conn.fetchrow(
        f"""INSERT INTO messages (id, conversation_id, parent_id, role, content, adapter_version, model, sampling,
                                  finish_reason, prompt_tokens, completion_tokens, latency_ms)
            VALUES (coalesce($1, gen_random_uuid()), $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
            RETURNING {MESSAGE_COLUMNS}""",
        message_id, conversation_id, parent_id, role, content, reply.get("adapter_version"), reply.get("model"),
        reply.get("sampling"), reply.get("finish_reason"), reply.get("prompt_tokens"),
        reply.get("completion_tokens"), reply.get("latency_ms"))
