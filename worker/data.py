"""Feedback -> the datasets of one training run, built with the feedback export code (service/feedback/export.py).

On top of the export this adds what training needs and an export must not decide: a stable held-out split by
prompt (the same prompt always lands on the same side, so held-out prompts never leak into training) and a cap on
how much of any dataset one API key may contribute, so one key cannot steer the model alone.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from service.feedback.export import FORMATS, ExportFilter, ExportRow, export_rows


@dataclass
class Split:
    train: list[dict] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)


@dataclass
class TrainingData:
    sft: Split = field(default_factory=Split)
    dpo: Split = field(default_factory=Split)
    kto: Split = field(default_factory=Split)
    data_until: datetime | None = None
    dropped_by_owner_cap: int = 0
    best_of_k: list[dict] = field(default_factory=list)  # SFT rows the reward model picked (worker/sampling.py)

    def counts(self) -> dict[str, int]:
        out = {f"{fmt}_{part}": len(getattr(getattr(self, fmt), part)) for fmt in FORMATS
               for part in ("train", "heldout")}
        out["dropped_by_owner_cap"] = self.dropped_by_owner_cap
        return out

    @property
    def empty(self) -> bool:
        return not any(getattr(self, fmt).train for fmt in FORMATS)


def is_heldout(prompt_key: str, fraction: float, salt: str = "heldout") -> bool:
    """Stable across runs and processes: a hash of the prompt, not a random draw. Another ``salt`` draws another,
    independent share of prompts."""
    return draw(prompt_key, salt) < fraction * 10_000


def draw(prompt_key: str, salt: str = "heldout") -> int:
    """The prompt's place in ``salt``'s stable draw, 0-9999: shares of prompts are those below a bound."""
    return int(hashlib.sha256(f"{salt}:{prompt_key}".encode()).hexdigest(), 16) % 10_000


def cap_per_owner(rows: list[ExportRow], max_share: float) -> tuple[list[ExportRow], int]:
    """Keep at most ``max_share`` of the rows from any one owner (newest first); (kept rows, dropped count).

    With few owners the cap cannot be met by everyone; each owner then keeps at least one row, so a
    single-user deployment still trains.
    """
    if not rows or max_share >= 1:
        return rows, 0
    by_owner: dict[int, list[ExportRow]] = defaultdict(list)
    for row in rows:
        by_owner[row.owner].append(row)
    others = {owner: len(rows) - len(own) for owner, own in by_owner.items()}
    kept: list[ExportRow] = []
    for owner, own in by_owner.items():
        # The owner's share of the final set: n / (n + others) <= max_share  <=>  n <= max_share * others / (1 - max)
        limit = max(1, int(max_share * others[owner] / (1 - max_share)))
        own.sort(key=lambda r: r.updated_at, reverse=True)
        kept.extend(own[:limit])
    kept.sort(key=lambda r: r.updated_at)
    return kept, len(rows) - len(kept)


async def count_new_feedback(conn: asyncpg.Connection | asyncpg.Pool, since: datetime | None) -> int:
    """Usable feedback (live, unflagged) changed after ``since``: what decides whether a run is due."""
    return await conn.fetchval(
        """SELECT count(*) FROM feedback f JOIN api_keys k ON k.id = f.owner
           WHERE f.retracted_at IS NULL AND k.flagged_at IS NULL
             AND ($1::timestamptz IS NULL OR f.updated_at > $1)""", since)


async def build_training_data(conn: asyncpg.Connection | asyncpg.Pool, heldout_fraction: float,
                              max_owner_share: float, until: datetime | None = None) -> TrainingData:
    """All usable feedback up to ``until`` (default now: a replay passes an earlier run's), split and capped;
    ``data_until`` is the newest feedback it saw."""
    until = until or await conn.fetchval("SELECT now()")
    data = TrainingData(data_until=until)
    for fmt in FORMATS:
        rows = await export_rows(conn, fmt, ExportFilter(until=until))
        split: Split = getattr(data, fmt)
        train_rows = []
        for row in rows:
            if is_heldout(row.prompt_key, heldout_fraction):
                split.heldout.append(row.data)
            else:
                train_rows.append(row)
        kept, dropped = cap_per_owner(train_rows, max_owner_share)
        split.train = [r.data for r in kept]
        data.dropped_by_owner_cap += dropped
    return data
