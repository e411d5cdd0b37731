"""The worker's main loop: connect, keep the schema current, stay alive until told to stop.

This is the process skeleton the training loop (DESIGN.md "Training loop") will run in: it owns the pool and the
Redis client, advertises itself with a heartbeat key and stops cleanly on SIGTERM/SIGINT. It does not train yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket

import redis.asyncio as aioredis

from service.app import open_database
from service.settings import Settings

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set or the process gets SIGTERM/SIGINT."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = await open_database(settings)
    redis = aioredis.from_url(settings.redis_url)
    heartbeat_key = f"flywheel:worker:{worker_id()}"
    interval = settings.training.train_poll_s
    log.info("worker %s started (training is not implemented yet)", worker_id())
    try:
        while not stop.is_set():
            try:
                await redis.set(heartbeat_key, "alive", ex=max(1, int(interval * 3)))
            except (OSError, aioredis.RedisError) as exc:  # Redis down: keep running, it holds nothing we need
                log.warning("heartbeat failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
    finally:
        with contextlib.suppress(OSError, aioredis.RedisError):
            await redis.delete(heartbeat_key)
        await redis.aclose()
        await pool.close()
        log.info("worker %s stopped", worker_id())
