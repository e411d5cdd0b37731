"""The embedded PostgreSQL and Redis that `flywheel up` starts on a machine that has neither."""

import asyncio
import socket

import asyncpg
import redis.asyncio as aioredis

from service.embedded import Backends, EmbeddedPostgres, EmbeddedRedis, postgres_answers, redis_answers
from service.settings import Settings


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _query_and_publish(database_url: str, redis_url: str) -> tuple[int, bytes]:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kept (n int)")
        await conn.execute("INSERT INTO kept VALUES (41)")
        total = await conn.fetchval("SELECT sum(n) + 1 FROM kept")
    finally:
        await conn.close()
    client = aioredis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe("flywheel:test")
    await pubsub.get_message(timeout=1)  # the subscribe confirmation
    await client.publish("flywheel:test", "hello")
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    await pubsub.aclose()
    await client.aclose()
    return total, message["data"]


def test_embedded_postgres_and_redis_start_on_free_ports_serve_and_stop(shared_tmp):
    pg = EmbeddedPostgres(shared_tmp / "embedded-pg")
    rd = EmbeddedRedis(shared_tmp / "embedded-redis")
    try:
        database_url, redis_url = pg.start(), rd.start()
        assert asyncio.run(_query_and_publish(database_url, redis_url)) == (42, b"hello")
    finally:
        rd.stop()
        pg.stop()
    assert not _port_open(pg.port) and not _port_open(rd.port)
    assert not asyncio.run(postgres_answers(pg.url)) and not asyncio.run(redis_answers(rd.url))

    # The cluster survives a restart: data under FLYWHEEL_DATA_DIR is kept.
    again = EmbeddedPostgres(shared_tmp / "embedded-pg")
    try:
        again.start()

        async def count():
            conn = await asyncpg.connect(again.url)
            try:
                return await conn.fetchval("SELECT count(*) FROM kept")
            finally:
                await conn.close()

        assert asyncio.run(count()) == 1
    finally:
        again.stop()


def test_backends_embed_when_asked_and_point_children_at_them(shared_tmp):
    settings = Settings.from_env({"FLYWHEEL_DATA_DIR": str(shared_tmp / "backends")})
    with Backends(settings, "always") as backends:
        assert backends.embedded == ["postgres", "redis"]
        env = backends.env()
        assert env["FLYWHEEL_DATABASE_URL"].endswith("/flywheel")
        assert asyncio.run(redis_answers(env["FLYWHEEL_REDIS_URL"]))
        assert asyncio.run(postgres_answers(env["FLYWHEEL_DATABASE_URL"]))
    assert not asyncio.run(redis_answers(env["FLYWHEEL_REDIS_URL"]))


def test_configured_backends_are_never_embedded(database_url, redis_url, shared_tmp):
    settings = Settings.from_env({"FLYWHEEL_DATABASE_URL": database_url, "FLYWHEEL_REDIS_URL": redis_url,
                                  "FLYWHEEL_DATA_DIR": str(shared_tmp / "configured")})
    with Backends(settings, "auto") as backends:
        assert backends.embedded == []
        assert backends.env() == {"FLYWHEEL_DATABASE_URL": database_url, "FLYWHEEL_REDIS_URL": redis_url}
