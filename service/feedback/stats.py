"""Per adapter version (base included) and per day: replies and what users said about them.

Everything is keyed by the reply: the day a reply was written and the version that wrote it; its thumbs, ratings,
edits and comparison wins count toward that version and day. Retracted feedback and flagged keys are left out,
as in training data: a key flagged for poisoning must not steer rollouts either. These numbers decide canary
promotions, so they are computed in one SQL query, exactly, and approval carries a Wilson 95% interval.
"""

from __future__ import annotations

import math
from datetime import datetime

import asyncpg

Z95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval for a proportion; None without trials."""
    if trials == 0:
        return None
    p = successes / trials
    denominator = 1 + z * z / trials
    center = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # at 0 (or all) successes the bound is exactly 0 (1); the float arithmetic leaves 7e-18 at 0 of 48
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == trials else min(1.0, center + half)
    return low, high


_COUNTS = ("replies", "thumbs_up", "thumbs_down", "ratings", "rating_sum", "edits", "comparisons",
           "comparison_wins")


def summarize(counts: dict) -> dict:
    """Add the derived figures to raw counts."""
    thumbs = counts["thumbs_up"] + counts["thumbs_down"]
    interval = wilson_interval(counts["thumbs_up"], thumbs)
    out = {k: counts[k] for k in _COUNTS if k != "rating_sum"}
    out["approval"] = counts["thumbs_up"] / thumbs if thumbs else None
    out["approval_ci95"] = list(interval) if interval else None
    out["mean_rating"] = counts["rating_sum"] / counts["ratings"] if counts["ratings"] else None
    out["comparison_win_rate"] = counts["comparison_wins"] / counts["comparisons"] if counts["comparisons"] else None
    return out


async def adapter_stats(conn: asyncpg.Connection | asyncpg.Pool, since: datetime | None, until: datetime | None,
                        version: int | None = None, only_version: bool = False) -> list[dict]:
    """One entry per version (base as version None) with totals and days; ``only_version`` limits to ``version``."""
    rows = await conn.fetch(
        """WITH replies AS (
               SELECT m.id, m.parent_id, m.adapter_version, (m.created_at AT TIME ZONE 'UTC')::date AS day
               FROM messages m
               WHERE m.role = 'assistant'
                 AND ($1::timestamptz IS NULL OR m.created_at >= $1) AND ($2::timestamptz IS NULL OR m.created_at < $2)
                 AND (NOT $4 OR m.adapter_version IS NOT DISTINCT FROM $3)),
           live AS (
               SELECT f.* FROM feedback f JOIN api_keys k ON k.id = f.owner
               WHERE f.retracted_at IS NULL AND k.flagged_at IS NULL)
           SELECT r.adapter_version, r.day, count(*) AS replies,
                  sum(a.up) AS thumbs_up, sum(a.down) AS thumbs_down, sum(a.ratings) AS ratings,
                  sum(a.rating_sum) AS rating_sum, sum(a.edits) AS edits,
                  sum(c.comparisons) AS comparisons, sum(c.wins) AS comparison_wins
           FROM replies r
           CROSS JOIN LATERAL (
               SELECT count(*) FILTER (WHERE kind = 'thumb' AND value = 1) AS up,
                      count(*) FILTER (WHERE kind = 'thumb' AND value = -1) AS down,
                      count(*) FILTER (WHERE kind = 'rating') AS ratings,
                      coalesce(sum(value) FILTER (WHERE kind = 'rating'), 0) AS rating_sum,
                      count(*) FILTER (WHERE kind = 'edit') AS edits
               FROM live WHERE live.message_id = r.id) a
           CROSS JOIN LATERAL (
               SELECT count(*) AS comparisons, count(*) FILTER (WHERE preferred_message_id = r.id) AS wins
               FROM live WHERE live.kind = 'comparison' AND live.message_id = r.parent_id) c
           GROUP BY r.adapter_version, r.day
           ORDER BY r.adapter_version NULLS FIRST, r.day""",
        since, until, version, only_version)
    by_version: dict[int | None, list] = {}
    for row in rows:
        by_version.setdefault(row["adapter_version"], []).append(row)
    result = []
    for v, days in by_version.items():
        totals = {k: sum(int(d[k]) for d in days) for k in _COUNTS}
        result.append({
            "version": v, "model": "base" if v is None else f"flywheel:v{v}", "totals": summarize(totals),
            "by_day": [{"day": d["day"].isoformat(), **summarize({k: int(d[k]) for k in _COUNTS})} for d in days],
        })
    return result
