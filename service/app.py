"""create_app(settings) -> Litestar: wiring and lifespan only.

Resources (asyncpg pool, Redis client, engine) open in the lifespan and live on ``app.state``, with the feature
services built on them. Liveness (`/health`) answers without touching anything; readiness (`/ready`) checks what a
request needs; `/metrics` is Prometheus text.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from litestar import Litestar, MediaType, Response, get
from litestar.datastructures import State
from litestar.di import Provide

from service import db
from service.adapters.events import keep_in_sync
from service.adapters.routes import AdapterController
from service.adapters.service import AdapterService
from service.auth import KeyCache, authenticate, hash_key
from service.chat.routes import ConversationController, OpenAIController
from service.chat.service import ChatService
from service.engine import create_engine
from service.errors import exception_handlers
from service.feedback.routes import FeedbackController
from service.feedback.service import FeedbackService
from service.keys.routes import KeyController
from service.metrics import Metrics
from service.runs.routes import RunController
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
    health = state.engine.health()
    checks["engine"] = "ok" if health.ok else f"error: {health.detail or 'not running'}"
    # A live adapter this process cannot load means it would answer with another version than its peers.
    failing = ", ".join(f"v{v}" for v in state.adapters.load_errors)
    checks["adapters"] = f"error: {failing} cannot be loaded" if failing else "ok"
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ok else "not ready", "checks": checks, "model": health.model,
            "loaded_adapters": health.loaded_adapters,
            "serving": {alias: row["version"] if row else None for alias, row in state.adapters.aliases.items()},
            "adapter_load_errors": {f"v{v}": e for v, e in state.adapters.load_errors.items()}}
    return Response(body, status_code=200 if ok else 503)


@get("/metrics", media_type=MediaType.TEXT)
async def metrics(state: State) -> Response:
    text = state.metrics.render(state.engine, state.adapters.aliases)
    return Response(text, media_type="text/plain; version=0.0.4")


async def open_database(settings: Settings):
    """The pool, after creating the database and applying migrations when FLYWHEEL_AUTO_MIGRATE allows."""
    if settings.db.auto_migrate:
        await db.ensure_database(settings.database_url)
    pool = await db.create_pool(settings.database_url, settings.db.database_pool_size)
    if settings.db.auto_migrate:
        async with pool.acquire() as conn:
            await db.migrate(conn)
    return pool


async def register_admin_key(pool, settings: Settings) -> None:
    """FLYWHEEL_ADMIN_KEY becomes a key row (once), so its requests have an owner like any other."""
    if settings.auth.admin_key:
        await pool.execute(
            "INSERT INTO api_keys (name, role, key_hash, key_prefix) VALUES ('bootstrap-admin', 'admin', $1, $2) "
            "ON CONFLICT (key_hash) DO NOTHING", hash_key(settings.auth.admin_key), settings.auth.admin_key[:8])


def create_app(settings: Settings) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        state = app.state
        state.settings = settings
        state.metrics = Metrics()
        state.pool = await open_database(settings)
        state.redis = aioredis.from_url(settings.redis_url)
        state.engine = create_engine(settings)
        state.key_cache = KeyCache(state.pool, settings.auth.key_cache_s)
        revocations = asyncio.create_task(state.key_cache.listen(settings.database_url))
        try:
            await register_admin_key(state.pool, settings)
            await state.engine.start()
            state.adapters = AdapterService(state.pool, state.engine, settings, state.redis, state.metrics)
            await state.adapters.reconcile()
            sync = asyncio.create_task(keep_in_sync(state.adapters, state.redis, settings.rollout.reconcile_s))
            state.chat = ChatService(state.pool, state.redis, state.engine, state.adapters, settings, state.metrics)
            state.feedback = FeedbackService(state.pool, settings)
            log.info("serving %s with the %s engine", settings.base_model, settings.engine.engine)
            # The model and libraries are ~400k long-lived objects; a full collection walking them pauses every
            # request for ~0.4 s (the p99 of short requests). Freezing moves them out of the collector's sight.
            gc.freeze()
            yield
            sync.cancel()
        finally:
            revocations.cancel()
            await state.engine.stop()
            await state.redis.aclose()
            await state.pool.close()

    return Litestar(
        route_handlers=[health, ready, metrics, OpenAIController, ConversationController, FeedbackController,
                        RunController, AdapterController, KeyController],
        dependencies={"caller": Provide(authenticate)},
        lifespan=[lifespan],
        exception_handlers=exception_handlers,
        debug=False,
    )
