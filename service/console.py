"""What every `flywheel` command shares: the settings, the consoles, one-line errors, running async work.

Commands print tables for people and JSON with ``--json``. Expected failures end with one line on stderr and exit
status 2 (``CommandError``), never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from functools import cache
from typing import Annotated

import typer
from rich.console import Console

from service.settings import Settings, mask

out = Console()
err = Console(stderr=True)
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class CommandError(RuntimeError):
    """An expected failure of a command; shown as one line."""


@cache
def settings() -> Settings:
    return Settings.from_env()


def setup_logging(level: str | None = None) -> None:
    logging.basicConfig(level=(level or settings().server.log_level).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_async(coro):
    """Run a coroutine; turn 'cannot connect' into one line naming what could not be reached."""
    try:
        return asyncio.run(coro)
    except (TimeoutError, OSError) as exc:  # what asyncpg and redis raise when they cannot connect
        s = settings()
        raise CommandError(
            f"cannot connect ({exc}); check that PostgreSQL at {mask('url', s.database_url)} "
            f"(FLYWHEEL_DATABASE_URL) and Redis at {mask('url', s.redis_url)} (FLYWHEEL_REDIS_URL) are running"
        ) from exc


async def with_database(work):
    """Run ``work(conn)`` on a migrated database."""
    import asyncpg

    from service import db

    s = settings()
    await db.ensure_database(s.database_url)
    conn = await asyncpg.connect(s.database_url)
    try:
        await db.init_connection(conn)
        if s.db.auto_migrate:
            await db.migrate(conn)
        return await work(conn)
    finally:
        await conn.close()
