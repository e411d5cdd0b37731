"""Migrations and the invariants the schema enforces, on a real PostgreSQL."""

import asyncio
import dataclasses

import asyncpg
import pytest

from service import db

TABLES = {"api_keys", "conversations", "messages", "feedback", "adapters", "training_runs", "adapter_events"}
SHA = "ab" * 32


async def test_migrations_apply_on_an_empty_database_and_reapply_as_a_no_op(empty_database_url):
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await db.schema_version(conn) == 0
        applied = await db.migrate(conn)
        assert [m.name for m in applied] == ["initial"]
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert tables >= TABLES
        assert await db.migrate(conn) == []
        assert await db.schema_version(conn) == len(db.load_migrations())
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_file_once(empty_database_url):
    conns = [await asyncpg.connect(empty_database_url) for _ in range(3)]
    try:
        results = await asyncio.gather(*(db.migrate(c) for c in conns))
        assert sorted(len(r) for r in results) == [0, 0, len(db.load_migrations())]
        assert await conns[0].fetchval("SELECT count(*) FROM schema_migrations") == len(db.load_migrations())
    finally:
        for c in conns:
            await c.close()


async def test_an_edited_applied_migration_is_refused(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        edited = [dataclasses.replace(m, sql=m.sql + "\n-- edited") for m in db.load_migrations()]
        with pytest.raises(db.MigrationError, match="was changed after it was applied"):
            await db.migrate(conn, edited)
        with pytest.raises(db.MigrationError, match="does not know: upgrade Flywheel"):
            await db.migrate(conn, [])
    finally:
        await conn.close()


async def test_ensure_database_creates_a_missing_database(postgres_server_url):
    from tests.conftest import with_database

    url = with_database(postgres_server_url, "flywheel_test_created_here")
    try:
        assert await db.ensure_database(url) is True
        assert await db.ensure_database(url) is False
    finally:
        conn = await asyncpg.connect(postgres_server_url)
        await conn.execute('DROP DATABASE IF EXISTS "flywheel_test_created_here" WITH (FORCE)')
        await conn.close()


@pytest.fixture
async def conn(database_url):
    pool = await db.create_pool(database_url, 2)
    async with pool.acquire() as connection:
        yield connection
    await pool.close()


async def _adapter(conn, name, status="candidate", **extra):
    fields = {"name": name, "base_model": "base", "algorithm": "sft", "status": status, "path": f"/a/{name}",
              "sha256": SHA, "size_bytes": 7, **extra}
    columns = ", ".join(fields)
    placeholders = ", ".join(f"${i}" for i in range(1, len(fields) + 1))
    return await conn.fetchval(f"INSERT INTO adapters ({columns}) VALUES ({placeholders}) RETURNING version",
                               *fields.values())


async def test_at_most_one_production_and_one_canary_adapter(conn):
    first = await _adapter(conn, "v-a", "production")
    with pytest.raises(asyncpg.UniqueViolationError, match="adapters_one_production"):
        await _adapter(conn, "v-b", "production")
    second = await _adapter(conn, "v-b")
    with pytest.raises(asyncpg.UniqueViolationError, match="adapters_one_production"):
        await conn.execute("UPDATE adapters SET status = 'production' WHERE version = $1", second)
    await _adapter(conn, "v-c", "canary", canary_percent=10)
    with pytest.raises(asyncpg.UniqueViolationError, match="adapters_one_canary"):
        await _adapter(conn, "v-d", "canary", canary_percent=10)
    # Retiring the old production frees the slot: the swap works inside one transaction.
    async with conn.transaction():
        await conn.execute("UPDATE adapters SET status = 'retired' WHERE version = $1", first)
        await conn.execute("UPDATE adapters SET status = 'production' WHERE version = $1", second)
    assert await conn.fetchval("SELECT version FROM adapters WHERE status = 'production'") == second


async def test_servable_adapters_need_checksummed_files(conn):
    with pytest.raises(asyncpg.CheckViolationError):
        await _adapter(conn, "no-files", "candidate", sha256=None)
    with pytest.raises(asyncpg.CheckViolationError):
        await _adapter(conn, "bad-sha", "candidate", sha256="not-a-sha")
    with pytest.raises(asyncpg.CheckViolationError):
        await _adapter(conn, "canary-without-share", "canary")
    # A run in progress has no files yet, and that is fine.
    assert await _adapter(conn, "in-training", "training", path=None, sha256=None, size_bytes=None)


async def _conversation_with_answer(conn):
    owner = await conn.fetchval(
        "INSERT INTO api_keys (name, role, key_hash, key_prefix) VALUES ('alice', 'user', 'h1', 'fw_a') RETURNING id")
    conversation = await conn.fetchval("INSERT INTO conversations (owner) VALUES ($1) RETURNING id", owner)
    question = await conn.fetchval(
        "INSERT INTO messages (conversation_id, role, content) VALUES ($1, 'user', 'hi') RETURNING id", conversation)
    answer = await conn.fetchval(
        "INSERT INTO messages (conversation_id, parent_id, role, content, completion_tokens) "
        "VALUES ($1, $2, 'assistant', 'hello', 1) RETURNING id", conversation, question)
    return owner, answer


async def test_one_feedback_row_per_message_owner_and_kind(conn):
    owner, answer = await _conversation_with_answer(conn)
    insert = "INSERT INTO feedback (message_id, owner, kind, value) VALUES ($1, $2, 'thumb', $3)"
    await conn.execute(insert, answer, owner, 1)
    with pytest.raises(asyncpg.UniqueViolationError):
        await conn.execute(insert, answer, owner, -1)
    await conn.execute(insert + " ON CONFLICT (message_id, owner, kind) DO UPDATE SET value = excluded.value",
                       answer, owner, -1)
    rows = await conn.fetch("SELECT value FROM feedback WHERE message_id = $1", answer)
    assert [r["value"] for r in rows] == [-1]
    # A rating is another kind: it lives beside the thumb.
    await conn.execute("INSERT INTO feedback (message_id, owner, kind, value) VALUES ($1, $2, 'rating', 4)",
                       answer, owner)
    assert await conn.fetchval("SELECT count(*) FROM feedback WHERE message_id = $1", answer) == 2


@pytest.mark.parametrize(
    ("kind", "value", "content"),
    [("thumb", 2, None), ("rating", 6, None), ("rating", 0, None), ("edit", None, ""), ("edit", 1, "fixed"),
     ("comparison", None, None)],
)
async def test_feedback_values_are_checked(conn, kind, value, content):
    owner, answer = await _conversation_with_answer(conn)
    with pytest.raises(asyncpg.CheckViolationError):
        await conn.execute("INSERT INTO feedback (message_id, owner, kind, value, content) VALUES ($1,$2,$3,$4,$5)",
                           answer, owner, kind, value, content)


async def test_foreign_keys_hold(conn):
    owner, answer = await _conversation_with_answer(conn)
    missing = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute("INSERT INTO feedback (message_id, owner, kind, value) VALUES ($1, $2, 'thumb', 1)",
                           missing, owner)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute("UPDATE messages SET adapter_version = 999 WHERE id = $1", answer)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await conn.execute("INSERT INTO adapter_events (version, to_status, actor) VALUES (999, 'canary', 'op')")


async def test_one_training_run_at_a_time(conn):
    await conn.execute("INSERT INTO training_runs (status, algorithm, started_at) VALUES ('running', 'sft', now())")
    with pytest.raises(asyncpg.UniqueViolationError, match="training_runs_one_running"):
        await conn.execute("INSERT INTO training_runs (status, algorithm, started_at) VALUES ('running', 'dpo', now())")
    with pytest.raises(asyncpg.CheckViolationError):  # a failed run says why
        await conn.execute("INSERT INTO training_runs (status, algorithm, finished_at) VALUES ('failed', 'sft', now())")
