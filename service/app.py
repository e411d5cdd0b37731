"""create_app(settings) -> Litestar: wiring and lifespan only.

Resources (asyncpg pool, Redis client) open in the lifespan and live on ``app.state``; features add their routers
here. Liveness (`/health`) answers without touching anything; readiness (`/ready`) checks what a request needs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from litestar import Litestar, Response, get
from litestar.datastructures import State

from service import db
from service.errors import exception_handlers
from service.settings import Settings

log = logging.getLogger(__name__)


@get("/health", sync_to_thread=False)
def health() -> dict[str, str]:
    """Alive: the process answers. Load balancers restart what fails this."""
    return {"status": "ok"}


@get("/ready")
async def ready(state: State) -> Response[dict]:
    """Ready: every dependency a request needs answers; 503 with the failing checks otherwise."""
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await state.pool.fetchval("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        async with asyncio.timeout(2):
            await state.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["redis"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return Response({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


async def open_database(settings: Settings):
    """The pool, after creating the database and applying migrations when FLYWHEEL_AUTO_MIGRATE allows."""
    if settings.db.auto_migrate:
        await db.ensure_database(settings.database_url)
    pool = await db.create_pool(settings.database_url, settings.db.database_pool_size)
    if settings.db.auto_migrate:
        async with pool.acquire() as conn:
            await db.migrate(conn)
    return pool


def create_app(settings: Settings) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.pool = await open_database(settings)
        app.state.redis = aioredis.from_url(settings.redis_url)
        try:
            yield
        finally:
            await app.state.redis.aclose()
            await app.state.pool.close()

    return Litestar(
        route_handlers=[health, ready],
        lifespan=[lifespan],
        exception_handlers=exception_handlers,
        debug=False,
    )
