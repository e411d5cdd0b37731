"""The API process: liveness, readiness against real backends, and errors in the right shape."""

import asyncpg
from litestar.testing import AsyncTestClient

from service import db
from service.app import create_app
from service.settings import Settings


async def test_health_and_ready_with_real_backends(database_url, redis_url, default_model):
    settings = Settings.from_env({"FLYWHEEL_DATABASE_URL": database_url, "FLYWHEEL_REDIS_URL": redis_url})
    async with AsyncTestClient(app=create_app(settings)) as client:
        assert (await client.get("/health")).json() == {"status": "ok"}
        ready = await client.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "engine": "ok", "adapters": "ok"}
        assert ready.json()["model"].endswith("SmolLM2-135M-Instruct")
        missing = await client.get("/api/nothing-here")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
        assert missing.json()["status"] == 404


async def test_ready_names_the_failing_dependency(database_url, default_model):
    # Nothing listens on port 1: Redis is "down" while the database is fine.
    settings = Settings.from_env({"FLYWHEEL_DATABASE_URL": database_url, "FLYWHEEL_REDIS_URL": "redis://127.0.0.1:1/0"})
    async with AsyncTestClient(app=create_app(settings)) as client:
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["redis"].startswith("error")


async def test_the_api_applies_pending_migrations_at_start(empty_database_url, redis_url, default_model):
    settings = Settings.from_env({"FLYWHEEL_DATABASE_URL": empty_database_url, "FLYWHEEL_REDIS_URL": redis_url})
    async with AsyncTestClient(app=create_app(settings)) as client:
        assert (await client.get("/ready")).status_code == 200
    conn = await asyncpg.connect(empty_database_url)
    try:
        assert await db.schema_version(conn) == len(db.load_migrations())
    finally:
        await conn.close()
