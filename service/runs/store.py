"""SQL for training runs. A run is queued (by hand) or created running (by a trigger); the partial unique index
on status = 'running' keeps it to one at a time whatever the workers believe."""

from __future__ import annotations

from datetime import datetime

import asyncpg

Conn = asyncpg.Connection | asyncpg.Pool
COLUMNS = ("id, status, algorithm, trigger, requested_by, worker, data_until, counts, params, metrics, progress, "
           "error, created_at, heartbeat_at, started_at, finished_at")


async def queue(conn: Conn, *, algorithm: str, params: dict, requested_by: str, trigger: str = "manual"):
    return await conn.fetchrow(
        f"INSERT INTO training_runs (algorithm, params, requested_by, trigger) VALUES ($1, $2, $3, $4) "
        f"RETURNING {COLUMNS}", algorithm, params, requested_by, trigger)


async def get(conn: Conn, run_id: int):
    return await conn.fetchrow(f"SELECT {COLUMNS} FROM training_runs WHERE id = $1", run_id)


async def recent(conn: Conn, limit: int, offset: int = 0):
    return await conn.fetch(f"SELECT {COLUMNS} FROM training_runs ORDER BY id DESC LIMIT $1 OFFSET $2",
                            limit, offset)


async def oldest_queued(conn: Conn):
    return await conn.fetchrow(f"SELECT {COLUMNS} FROM training_runs WHERE status = 'queued' ORDER BY id LIMIT 1")


async def running(conn: Conn):
    return await conn.fetch(f"SELECT {COLUMNS} FROM training_runs WHERE status = 'running'")


async def start(conn: Conn, run_id: int, worker: str):
    """Claim a queued run; None if someone else did (or another run is running: the unique index says no)."""
    try:
        return await conn.fetchrow(
            f"UPDATE training_runs SET status = 'running', worker = $2, started_at = now(), heartbeat_at = now() "
            f"WHERE id = $1 AND status = 'queued' RETURNING {COLUMNS}", run_id, worker)
    except asyncpg.UniqueViolationError:
        return None


# What each logged step keeps in progress.history, so the UI can plot a run step by step (progress itself is only
# the latest report); TRL's DPO and KTO trainers both log their reward margin as "rewards/margins".
HISTORY_KEYS = ("stage", "step", "loss", "rewards/margins")


async def progress(conn: Conn, run_id: int, progress: dict) -> None:
    """Store the latest report and append its loss and reward margin to progress.history."""
    point = {k: progress[k] for k in HISTORY_KEYS if k in progress}
    # The trainer's closing report (runtime, mean train_loss) is not a step: it updates progress, not the history.
    points = [point] if "loss" in point or "rewards/margins" in point else []
    await conn.execute(
        """UPDATE training_runs
           SET progress = $2::jsonb || jsonb_build_object(
                   'history', coalesce(progress->'history', '[]'::jsonb) || $3::jsonb),
               heartbeat_at = now()
           WHERE id = $1""", run_id, progress, points)


async def record_data(conn: Conn, run_id: int, counts: dict, data_until: datetime, params: dict) -> None:
    await conn.execute("UPDATE training_runs SET counts = $2, data_until = $3, params = $4 WHERE id = $1",
                       run_id, counts, data_until, params)


async def finish(conn: Conn, run_id: int, status: str, *, metrics: dict | None = None, error: str | None = None):
    return await conn.fetchrow(
        f"UPDATE training_runs SET status = $2, metrics = coalesce($3, metrics), error = $4, finished_at = now() "
        f"WHERE id = $1 AND status IN ('queued', 'running') RETURNING {COLUMNS}", run_id, status, metrics, error)


async def last_data_until(conn: Conn) -> datetime | None:
    """The feedback watermark of the last run that finished its data step."""
    return await conn.fetchval("SELECT max(data_until) FROM training_runs WHERE status = 'succeeded'")


async def last_finished_at(conn: Conn) -> datetime | None:
    return await conn.fetchval("SELECT max(finished_at) FROM training_runs WHERE status = 'succeeded'")
