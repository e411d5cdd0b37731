"""API keys, roles and per-key rate limits.

Keys are random 256-bit tokens shown once and stored as their sha256 (a slow hash buys nothing for keys this
strong). Roles are ordered: user < operator < admin. Rate limits are fixed one-minute windows in Redis; when
Redis is down requests are let through (Redis holds no data, and refusing every request would be worse).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from enum import IntEnum

import asyncpg
import redis.asyncio as aioredis
from litestar import Request
from litestar.datastructures import State

from service.errors import Forbidden, RateLimited, Unauthorized
from service.settings import Settings

log = logging.getLogger(__name__)
KEY_PREFIX = "fw-"


class Role(IntEnum):
    user = 1
    operator = 2
    admin = 3


@dataclass(frozen=True)
class Caller:
    """Who is calling: the API key's row (FLYWHEEL_ADMIN_KEY has one too, made at start)."""

    key_id: int
    name: str
    role: Role
    key_hash: str  # identifies the key in Redis: ids repeat across databases sharing one Redis

    def require(self, role: Role) -> None:
        if self.role < role:
            raise Forbidden(f"this needs the {role.name} role; the key {self.name!r} is {self.role.name}")

    @property
    def owner(self) -> int:
        return self.key_id

    def may_see(self, owner: int) -> bool:
        """Users see their own conversations; admins see everyone's."""
        return owner == self.key_id or self.role >= Role.admin


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(conn: asyncpg.Connection | asyncpg.Pool, name: str, role: Role) -> tuple[int, str]:
    """(id, the key itself): the key is not stored and cannot be shown again."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = await conn.fetchval(
        "INSERT INTO api_keys (name, role, key_hash, key_prefix) VALUES ($1, $2, $3, $4) RETURNING id",
        name, role.name, hash_key(key), key[:8],
    )
    return key_id, key


async def list_keys(conn: asyncpg.Connection | asyncpg.Pool) -> list[dict]:
    rows = await conn.fetch("SELECT id, name, role, key_prefix, created_at, revoked_at, flagged_at FROM api_keys "
                            "ORDER BY id")
    return [dict(r) for r in rows]


async def revoke_key(conn: asyncpg.Connection | asyncpg.Pool, key_id: int) -> bool:
    """True if the key existed and was active."""
    status = await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id)
    return status.endswith(" 1")


async def key_is_valid(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                                    hash_key(key)))


async def authenticate(request: Request, state: State) -> Caller:
    """Litestar dependency: the caller behind the request's Bearer key, or 401."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>' (create one with `flywheel keys create`)")
    row = await state.pool.fetchrow(
        "SELECT id, name, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", hash_key(key.strip()))
    if row is None:
        raise Unauthorized("this API key is unknown or revoked")
    caller = Caller(row["id"], row["name"], Role[row["role"]], hash_key(key.strip()))
    await check_rate(state.redis, state.settings, caller)
    return caller


def _window() -> tuple[int, int]:
    now = time.time()
    return int(now // 60), 60 - int(now % 60)


async def check_rate(redis: aioredis.Redis, settings: Settings, caller: Caller) -> None:
    """Count this request; 429 with Retry-After when the key is over its requests or tokens per minute."""
    limits = settings.auth
    if not (limits.rate_limit_per_min or limits.tokens_per_min):
        return
    window, retry_after = _window()
    who = caller.key_hash[:24]
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incr(f"flywheel:rate:req:{who}:{window}")
            pipe.expire(f"flywheel:rate:req:{who}:{window}", 120)
            pipe.get(f"flywheel:rate:tok:{who}:{window}")
            requests, _, tokens = await pipe.execute()
    except (OSError, aioredis.RedisError) as exc:
        log.warning("rate limit not checked, Redis unavailable: %s", exc)
        return
    if limits.rate_limit_per_min and requests > limits.rate_limit_per_min:
        raise RateLimited(f"more than {limits.rate_limit_per_min} requests this minute for this key",
                          extra={"retry_after": retry_after})
    if limits.tokens_per_min and int(tokens or 0) >= limits.tokens_per_min:
        raise RateLimited(f"more than {limits.tokens_per_min} generated tokens this minute for this key",
                          extra={"retry_after": retry_after})


async def record_tokens(redis: aioredis.Redis, caller: Caller, tokens: int) -> None:
    if tokens <= 0:
        return
    window, _ = _window()
    who = caller.key_hash[:24]
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incrby(f"flywheel:rate:tok:{who}:{window}", tokens)
            pipe.expire(f"flywheel:rate:tok:{who}:{window}", 120)
            await pipe.execute()
    except (OSError, aioredis.RedisError) as exc:
        log.warning("tokens not counted, Redis unavailable: %s", exc)
