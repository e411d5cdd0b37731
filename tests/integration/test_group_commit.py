"""Group commit of feedback writes on a real Postgres: votes that arrive together share statements, each still
gets its own answer, two votes for one row never share a statement, and a bad vote fails only itself."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from service import db
from service.auth import Role, create_key
from service.feedback import store
from service.feedback.group_commit import GroupCommit
from service.feedback.store import Write


async def _replies(conn, owner: int, count: int) -> list[uuid.UUID]:
    """A conversation of ``owner`` with a question and ``count`` assistant replies to it."""
    conversation = await conn.fetchval("INSERT INTO conversations (owner) VALUES ($1) RETURNING id", owner)
    question = await conn.fetchval("INSERT INTO messages (conversation_id, role, content) VALUES ($1, 'user', 'q') "
                                   "RETURNING id", conversation)
    return [await conn.fetchval("INSERT INTO messages (conversation_id, parent_id, role, content) "
                                "VALUES ($1, $2, 'assistant', 'a') RETURNING id", conversation, question)
            for _ in range(count)]


@pytest.fixture
async def pool(database_url):
    pool = await db.create_pool(database_url, 4)
    yield pool
    await pool.close()


def _thumb(owner: int, message_id: uuid.UUID, value: int = 1) -> Write:
    return Write(rated_id=message_id, message_id=message_id, owner=owner, sees_everyone=False, kind="thumb",
                 value=value)


async def test_votes_arriving_together_share_statements_and_each_gets_its_answer(pool, monkeypatch):
    owner, _ = await create_key(pool, "voter", Role.user)
    replies = await _replies(pool, owner, 40)
    statements = []
    real_save = store.save

    async def counted_save(conn, writes):
        statements.append(len(writes))
        return await real_save(conn, writes)

    monkeypatch.setattr(store, "save", counted_save)
    writes = GroupCommit(pool, max_in_flight=1)
    results = await asyncio.gather(*(writes.save(_thumb(owner, m)) for m in replies))
    assert all(r.created and r.row["message_id"] == m for r, m in zip(results, replies, strict=True))
    assert sum(statements) == 40 and len(statements) < 40  # the first alone, the rest together
    assert await pool.fetchval("SELECT count(*) FROM feedback WHERE owner = $1", owner) == 40


async def test_votes_for_one_row_go_in_turn_and_end_as_one_row(pool):
    owner, _ = await create_key(pool, "changes-mind", Role.user)
    [reply] = await _replies(pool, owner, 1)
    writes = GroupCommit(pool, max_in_flight=2)
    results = await asyncio.gather(*(writes.save(_thumb(owner, reply, v)) for v in [1, -1] * 6))
    assert sum(r.created for r in results) == 1
    assert len({r.row["id"] for r in results}) == 1
    assert await pool.fetchval("SELECT count(*) FROM feedback WHERE message_id = $1", reply) == 1


async def test_a_bad_vote_fails_alone_and_the_rest_of_its_batch_is_stored(pool):
    owner, _ = await create_key(pool, "voter", Role.user)
    replies = await _replies(pool, owner, 10)
    gone = 10**9  # no such key: the insert breaks its foreign key, failing the whole statement it is in
    writes = GroupCommit(pool, max_in_flight=1)
    votes = [_thumb(owner, m) for m in replies]
    votes.insert(5, Write(rated_id=replies[0], message_id=replies[0], owner=gone, sees_everyone=True, kind="thumb",
                          value=1))
    results = await asyncio.gather(*(writes.save(v) for v in votes), return_exceptions=True)
    assert [type(r).__name__ for r in results].count("ForeignKeyViolationError") == 1
    assert isinstance(results[5], Exception)
    assert await pool.fetchval("SELECT count(*) FROM feedback WHERE owner = $1", owner) == 10


async def test_what_may_not_be_rated_is_reported_not_written(pool):
    alice, _ = await create_key(pool, "alice", Role.user)
    bob, _ = await create_key(pool, "bob", Role.user)
    [alices] = await _replies(pool, alice, 1)
    question = await pool.fetchval("SELECT parent_id FROM messages WHERE id = $1", alices)
    writes = GroupCommit(pool)
    missing, hidden, user_turn = await asyncio.gather(
        writes.save(_thumb(alice, uuid.uuid4())), writes.save(_thumb(bob, alices)),
        writes.save(_thumb(alice, question)))
    assert (missing.role, missing.row) == (None, None)
    assert (hidden.role, hidden.visible, hidden.row) == ("assistant", False, None)
    assert (user_turn.role, user_turn.visible, user_turn.row) == ("user", True, None)
    assert await pool.fetchval("SELECT count(*) FROM feedback") == 0
