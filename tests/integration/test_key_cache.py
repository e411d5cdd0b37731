"""The service trusts a key it has seen for FLYWHEEL_KEY_CACHE_S seconds: revocations must still take effect, at once
when made with revoke_key (`flywheel keys revoke`), within that bound when made behind the service's back."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from service.app import create_app
from service.auth import Role, create_key, revoke_key
from service.settings import Settings

pytestmark = pytest.mark.slow


def _app(database_url: str, redis_url: str, cache_s: float):
    return create_app(Settings.from_env({"FLYWHEEL_DATABASE_URL": database_url, "FLYWHEEL_REDIS_URL": redis_url,
                                         "FLYWHEEL_KEY_CACHE_S": str(cache_s)}))


async def _refused_within(client: AsyncTestClient, key: str, seconds: float) -> float:
    """Seconds until the key gets 401 (polling /api/conversations); fails the test past ``seconds``."""
    start = time.monotonic()
    while (await client.get("/api/conversations", headers={"Authorization": f"Bearer {key}"})).status_code != 401:
        assert time.monotonic() - start < seconds, f"the revoked key still worked after {seconds} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def _listener_pid(conn: asyncpg.Connection) -> int | None:
    return await conn.fetchval("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                               "AND query LIKE 'LISTEN %flywheel_key_revoked%'")


async def test_a_revoked_key_is_refused_at_once_despite_the_cache(database_url, redis_url, default_model):
    conn = await asyncpg.connect(database_url)
    try:
        async with AsyncTestClient(app=_app(database_url, redis_url, cache_s=60)) as client:
            key_id, key = await create_key(conn, "soon-revoked", Role.user)
            auth = {"Authorization": f"Bearer {key}"}
            assert (await client.get("/api/conversations", headers=auth)).status_code == 200  # cached for 60 s now
            assert await revoke_key(conn, key_id)
            assert await _refused_within(client, key, seconds=2) < 2

            # The listening connection dies (a Postgres restart, a proxy timeout): it comes back, and revocations
            # are heard again.
            listener = await _listener_pid(conn)
            assert listener is not None
            await conn.execute("SELECT pg_terminate_backend($1)", listener)
            deadline = time.monotonic() + 10
            while await _listener_pid(conn) in (None, listener):
                assert time.monotonic() < deadline, "the revocation listener did not reconnect"
                await asyncio.sleep(0.1)
            other_id, other = await create_key(conn, "revoked-after-reconnect", Role.user)
            assert (await client.get("/api/conversations", headers={"Authorization": f"Bearer {other}"})
                    ).status_code == 200
            assert await revoke_key(conn, other_id)
            assert await _refused_within(client, other, seconds=2) < 2
    finally:
        await conn.close()


async def test_a_key_revoked_behind_the_services_back_stops_within_the_cache_bound(database_url, redis_url,
                                                                                  default_model):
    conn = await asyncpg.connect(database_url)
    try:
        async with AsyncTestClient(app=_app(database_url, redis_url, cache_s=1)) as client:
            key_id, key = await create_key(conn, "revoked-by-hand", Role.user)
            auth = {"Authorization": f"Bearer {key}"}
            assert (await client.get("/api/conversations", headers=auth)).status_code == 200
            # A plain UPDATE announces nothing: only FLYWHEEL_KEY_CACHE_S bounds how long the key keeps working.
            await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
            assert await _refused_within(client, key, seconds=1 + 1.5) <= 2.5
    finally:
        await conn.close()


async def test_without_a_cache_every_request_looks_the_key_up(database_url, redis_url, default_model):
    conn = await asyncpg.connect(database_url)
    try:
        async with AsyncTestClient(app=_app(database_url, redis_url, cache_s=0)) as client:
            key_id, key = await create_key(conn, "uncached", Role.user)
            auth = {"Authorization": f"Bearer {key}"}
            assert (await client.get("/api/conversations", headers=auth)).status_code == 200
            await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
            assert (await client.get("/api/conversations", headers=auth)).status_code == 401
    finally:
        await conn.close()
