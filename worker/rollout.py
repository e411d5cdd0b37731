"""Automatic rollout: a gate-passing candidate goes to canary; live thumbs then promote it or reject it.

Once both arms (canary, and production or the base) have ``min_votes`` thumbs on replies written since the canary
started, a one-sided two-proportion z-test asks whether the canary's approval is worse than production's by more
than ``max_drop``: if the data rule that out at level ``alpha`` the canary is promoted, otherwise it is rejected.
A canary still undecided after ``max_hours`` is rejected. Every decision is an adapter event carrying its numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from statistics import NormalDist

import asyncpg

from service.adapters import registry


@dataclass(frozen=True)
class Arm:
    version: int | None
    up: int
    down: int

    @property
    def votes(self) -> int:
        return self.up + self.down

    @property
    def approval(self) -> float:
        return self.up / self.votes if self.votes else 0.0


@dataclass(frozen=True)
class Decision:
    action: str  # promote | reject | wait
    numbers: dict


def non_inferiority(canary: Arm, production: Arm, max_drop: float, alpha: float) -> tuple[float, float]:
    """(z, one-sided p) for H0: canary approval <= production approval - max_drop."""
    pc, pp = canary.approval, production.approval
    se = math.sqrt(max(pc * (1 - pc), 1e-9) / canary.votes + max(pp * (1 - pp), 1e-9) / production.votes)
    z = (pc - pp + max_drop) / se
    return z, 1 - NormalDist().cdf(z)


def decide(canary: Arm, production: Arm, started: datetime, *, min_votes: int, max_drop: float, alpha: float,
           max_hours: float, now: datetime | None = None) -> Decision:
    now = now or datetime.now(UTC)
    numbers = {"canary": vars(canary) | {"votes": canary.votes, "approval": canary.approval},
               "production": vars(production) | {"votes": production.votes, "approval": production.approval},
               "min_votes": min_votes, "max_drop": max_drop, "alpha": alpha}
    if canary.votes < min_votes or production.votes < min_votes:
        if now - started > timedelta(hours=max_hours):
            return Decision("reject", numbers | {"why": f"fewer than {min_votes} votes per arm after {max_hours} h"})
        return Decision("wait", numbers)
    z, p = non_inferiority(canary, production, max_drop, alpha)
    numbers |= {"z": round(z, 4), "p": round(p, 6)}
    return Decision("promote" if p < alpha else "reject", numbers)


async def arm(conn, version: int | None, since: datetime) -> Arm:
    """Thumbs (live, unflagged) on replies this version wrote since ``since``."""
    row = await conn.fetchrow(
        """SELECT count(*) FILTER (WHERE f.value = 1) AS up, count(*) FILTER (WHERE f.value = -1) AS down
           FROM messages m JOIN feedback f ON f.message_id = m.id AND f.kind = 'thumb' AND f.retracted_at IS NULL
           JOIN api_keys k ON k.id = f.owner AND k.flagged_at IS NULL
           WHERE m.role = 'assistant' AND m.created_at >= $2 AND m.adapter_version IS NOT DISTINCT FROM $1""",
        version, since)
    return Arm(version, row["up"], row["down"])


async def step(pool: asyncpg.Pool, *, min_votes: int, max_drop: float, alpha: float, max_hours: float,
               actor: str) -> Decision | None:
    """Decide the running canary if its votes allow; None when there is no canary."""
    async with pool.acquire() as conn:
        canary = await conn.fetchrow("SELECT version FROM adapters WHERE status = 'canary'")
        if canary is None:
            return None
        started = await conn.fetchval("SELECT max(at) FROM adapter_events WHERE version = $1 AND to_status = "
                                      "'canary'", canary["version"])
        production = await conn.fetchval("SELECT version FROM adapters WHERE status = 'production'")
        decision = decide(await arm(conn, canary["version"], started), await arm(conn, production, started),
                          started, min_votes=min_votes, max_drop=max_drop, alpha=alpha, max_hours=max_hours)
        if decision.action != "wait":
            async with conn.transaction():
                operation = registry.promote if decision.action == "promote" else registry.reject
                await operation(conn, canary["version"], actor=actor, reason=json.dumps(decision.numbers))
    return decision
