"""POST /api/runs: operators queue a run with any algorithm the worker knows, rl included; a bad one is a 400
naming the field, and nothing is queued."""

from __future__ import annotations

from litestar.testing import AsyncTestClient

from service import db
from service.app import create_app
from service.auth import Role, create_key
from service.settings import Settings


async def test_a_run_queues_with_rl_and_a_bad_algorithm_is_named(database_url, redis_url, default_model):
    pool = await db.create_pool(database_url, 1)
    try:
        _, operator_key = await create_key(pool, "olivia", Role.operator)
        settings = Settings.from_env({"FLYWHEEL_DATABASE_URL": database_url, "FLYWHEEL_REDIS_URL": redis_url})
        headers = {"Authorization": f"Bearer {operator_key}"}
        async with AsyncTestClient(app=create_app(settings)) as client:
            queued = await client.post("/api/runs", json={"algorithm": "rl", "max_steps": 3}, headers=headers)
            assert queued.status_code == 201, queued.text
            assert queued.json()["algorithm"] == "rl" and queued.json()["status"] == "queued"
            bad = await client.post("/api/runs", json={"algorithm": "ppo"}, headers=headers)
            assert bad.status_code == 400 and bad.json()["field"] == "algorithm", bad.text
        assert await pool.fetchval("SELECT count(*) FROM training_runs") == 1
    finally:
        await pool.close()
