"""Keeping every service process in line with the registry: Redis events for speed, a periodic reconcile for truth.

A registry change is published on ``flywheel:adapters`` after its transaction commits; each process reconciles
(loads the new version, then flips its aliases) when it hears one, and every FLYWHEEL_RECONCILE_S anyway, so an
event lost to a Redis restart only delays the switch. Publishing never fails a registry operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import redis.asyncio as aioredis

from service.adapters.service import AdapterService

log = logging.getLogger(__name__)
CHANNEL = "flywheel:adapters"


async def publish(redis: aioredis.Redis, event: dict) -> None:
    try:
        await redis.publish(CHANNEL, json.dumps(event, default=str))
    except (OSError, aioredis.RedisError) as exc:
        log.warning("adapter event not published (processes catch up on their next reconcile): %s", exc)


async def keep_in_sync(adapters: AdapterService, redis: aioredis.Redis, every_s: float) -> None:
    """Run until cancelled: reconcile on each event and at least every ``every_s`` seconds."""
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(CHANNEL)
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=every_s)
                await _reconcile(adapters, "event" if message else "timer")
        except (OSError, aioredis.RedisError) as exc:
            log.warning("adapter events unavailable (%s); reconciling every %.0f s", exc, every_s)
            await _reconcile(adapters, "timer")
            await asyncio.sleep(every_s)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


async def _reconcile(adapters: AdapterService, why: str) -> None:
    try:
        await adapters.reconcile()
    except Exception:  # noqa: BLE001 - a failed reconcile must not stop the next one
        log.exception("reconcile (%s) failed", why)
