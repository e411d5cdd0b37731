"""GET /api/me: clients learn who their key is and which role it has, and nothing about any other key."""

from __future__ import annotations

from litestar.testing import AsyncTestClient

from service import db
from service.app import create_app
from service.auth import Role, create_key, revoke_key
from service.settings import Settings


async def test_me_names_the_callers_key_and_role(database_url, redis_url, default_model):
    pool = await db.create_pool(database_url, 1)
    try:
        user_id, user_key = await create_key(pool, "alice", Role.user)
        operator_id, operator_key = await create_key(pool, "olivia", Role.operator)
        settings = Settings.from_env({"FLYWHEEL_DATABASE_URL": database_url, "FLYWHEEL_REDIS_URL": redis_url})
        async with AsyncTestClient(app=create_app(settings)) as client:
            me = await client.get("/api/me", headers={"Authorization": f"Bearer {user_key}"})
            assert me.status_code == 200 and me.json() == {"key_id": user_id, "name": "alice", "role": "user"}
            operator = await client.get("/api/me", headers={"Authorization": f"Bearer {operator_key}"})
            assert operator.json() == {"key_id": operator_id, "name": "olivia", "role": "operator"}

            anonymous = await client.get("/api/me")
            assert anonymous.status_code == 401 and "Bearer" in anonymous.json()["detail"]
            await revoke_key(pool, user_id)
            revoked = await client.get("/api/me", headers={"Authorization": f"Bearer {user_key}"})
            assert revoked.status_code == 401
    finally:
        await pool.close()
