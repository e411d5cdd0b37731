"""API keys, roles and per-key rate limits.

Keys are random 256-bit tokens shown once and stored as their sha256 (a slow hash buys nothing for keys this
strong). Roles are ordered: user < operator < admin. Each service process keeps the keys it has seen in a KeyCache
for FLYWHEEL_KEY_CACHE_S seconds, so a request costs no key lookup; a revocation reaches every process at once
through Postgres NOTIFY. Rate limits are fixed one-minute windows in Redis, counted only when set; when Redis is
down requests are let through (Redis holds no data, and refusing every request would be worse).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from enum import IntEnum

import asyncpg
import redis.asyncio as aioredis
from litestar import Request

from service.errors import Forbidden, RateLimited, Unauthorized
from service.settings import Settings

log = logging.getLogger(__name__)
KEY_PREFIX = "fw-"
REVOKED_CHANNEL = "flywheel_key_revoked"  # Postgres NOTIFY channel; the payload is the revoked key's hash


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

    @property
    def sees_everyone(self) -> bool:
        """Admins see every user's conversations (SQL that checks visibility takes this as a parameter)."""
        return self.role >= Role.admin

    def may_see(self, owner: int) -> bool:
        """Users see their own conversations; admins see everyone's."""
        return owner == self.key_id or self.sees_everyone


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
    """True if the key existed and was active. Postgres announces the revocation when it commits, and every
    service process's KeyCache forgets the key at once."""
    revoked = await conn.fetch(
        """WITH revoked AS (UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL
                            RETURNING key_hash)
           SELECT pg_notify($2, key_hash) FROM revoked""", key_id, REVOKED_CHANNEL)
    return len(revoked) == 1


async def key_is_valid(conn: asyncpg.Connection | asyncpg.Pool, key: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                                    hash_key(key)))


class KeyCache:
    """The callers behind the API keys this process has seen, trusted for ``ttl_s`` seconds without a lookup.

    ``revoke_key`` NOTIFYs the revoked key's hash when it commits, and ``listen`` drops it from the cache at once;
    ``ttl_s`` bounds everything else: a notice missed while the listening connection is down (the cache is emptied
    when it comes back), a key revoked or deleted in SQL by hand. Only valid keys are kept, so an unknown key is
    looked up every time and never becomes valid by accident.
    """

    def __init__(self, pool: asyncpg.Pool, ttl_s: float):
        self.pool, self.ttl_s = pool, ttl_s
        self._callers: dict[str, tuple[Caller, float]] = {}  # key hash -> (caller, monotonic expiry)
        self._forgotten = 0  # bumped by every forget(): a lookup that raced a revocation is not cached

    async def caller(self, key_hash: str) -> Caller | None:
        """The key's caller, or None if the key is unknown or revoked."""
        hit = self._callers.get(key_hash)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        forgotten = self._forgotten
        row = await self.pool.fetchrow("SELECT id, name, role FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
                                       key_hash)
        if row is None:
            self._callers.pop(key_hash, None)
            return None
        caller = Caller(row["id"], row["name"], Role[row["role"]], key_hash)
        if self.ttl_s > 0 and forgotten == self._forgotten:
            self._remember(key_hash, caller)
        return caller

    def forget(self, key_hash: str | None = None) -> None:
        """Drop one key (None: every key), so its next request is looked up again."""
        self._forgotten += 1
        if key_hash is None:
            self._callers.clear()
        else:
            self._callers.pop(key_hash, None)

    async def listen(self, database_url: str) -> None:
        """Run until cancelled: forget each key Postgres announces as revoked, on a connection of its own."""
        while True:
            try:
                conn = await asyncpg.connect(database_url)
            except Exception as exc:  # noqa: BLE001 - whatever it is, keep trying: the TTL bounds the damage
                log.warning("key revocations not heard (%s); cached keys expire after %.0f s", exc, self.ttl_s)
                await asyncio.sleep(max(self.ttl_s, 1.0))
                continue
            lost = asyncio.Event()
            try:
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(REVOKED_CHANNEL, self._revoked)
                self.forget()  # a revocation announced while nobody listened was missed: look every key up again
                await lost.wait()
                log.warning("the key revocation listener lost its connection; reconnecting")
            except Exception as exc:  # noqa: BLE001
                log.warning("key revocation listener failed (%s); reconnecting", exc)
                await asyncio.sleep(1.0)
            finally:
                conn.terminate()

    def _revoked(self, _conn: asyncpg.Connection, _pid: int, _channel: str, key_hash: str) -> None:
        self.forget(key_hash)

    def _remember(self, key_hash: str, caller: Caller) -> None:
        now = time.monotonic()
        if len(self._callers) >= 4096:  # keys deleted from the database would otherwise stay here for good
            self._callers = {k: v for k, v in self._callers.items() if v[1] > now}
        self._callers[key_hash] = (caller, now + self.ttl_s)


async def authenticate(request: Request) -> Caller:
    """Litestar dependency: the caller behind the request's Bearer key, or 401. It runs on every request, so it
    reads ``request.app.state`` rather than having Litestar build a State for it."""
    state = request.app.state
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>' (create one with `flywheel keys create`)")
    caller = await state.key_cache.caller(hash_key(key))
    if caller is None:
        raise Unauthorized("this API key is unknown or revoked")
    await count_request(state.redis, state.settings, caller)
    return caller


def _window() -> tuple[int, int]:
    now = time.time()
    return int(now // 60), 60 - int(now % 60)


async def count_request(redis: aioredis.Redis, settings: Settings, caller: Caller) -> None:
    """Count this request; 429 with Retry-After when the key is over its requests per minute. With the limit at 0
    nothing is counted and Redis is not asked."""
    limit = settings.auth.rate_limit_per_min
    if not limit:
        return
    window, retry_after = _window()
    counter = f"flywheel:rate:req:{caller.key_hash[:24]}:{window}"
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incr(counter)
            pipe.expire(counter, 120)
            requests, _ = await pipe.execute()
    except (OSError, aioredis.RedisError) as exc:
        log.warning("rate limit not checked, Redis unavailable: %s", exc)
        return
    if requests > limit:
        raise RateLimited(f"more than {limit} requests this minute for this key", extra={"retry_after": retry_after})


async def check_token_budget(redis: aioredis.Redis, settings: Settings, caller: Caller) -> None:
    """Before generating: 429 with Retry-After when the key has used its generated tokens per minute. Only requests
    that generate are checked: rating a reply or reading a conversation spends no tokens."""
    limit = settings.auth.tokens_per_min
    if not limit:
        return
    window, retry_after = _window()
    try:
        tokens = await redis.get(f"flywheel:rate:tok:{caller.key_hash[:24]}:{window}")
    except (OSError, aioredis.RedisError) as exc:
        log.warning("token budget not checked, Redis unavailable: %s", exc)
        return
    if int(tokens or 0) >= limit:
        raise RateLimited(f"more than {limit} generated tokens this minute for this key",
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
