"""`flywheel adapters ...`: the registry from the command line (the same operations as /api/adapters)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from service.console import CommandError, JsonOption, out, run_async, settings, with_database

adapters_app = typer.Typer(help="Adapters: list, inspect, import, canary, promote, roll back, retire, reject.",
                           no_args_is_help=True)


def _adapter_table(rows) -> Table:
    table = Table("version", "name", "status", "algorithm", "parent", "canary %", "accuracy", "created")
    for r in rows:
        accuracy = (r["metrics"] or {}).get("candidate_accuracy")
        table.add_row(f"v{r['version']}", r["name"], r["status"], r["algorithm"],
                      f"v{r['parent_version']}" if r["parent_version"] else "base", str(r["canary_percent"] or ""),
                      f"{accuracy:.3f}" if isinstance(accuracy, float) else "", f"{r['created_at']:%Y-%m-%d %H:%M}")
    return table


@adapters_app.command("list")
def adapters_list(status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
                  as_json: JsonOption = False) -> None:
    """Adapters, newest first."""
    from service.adapters.store import COLUMNS

    rows = run_async(with_database(lambda conn: conn.fetch(
        f"SELECT {COLUMNS} FROM adapters WHERE $1::text IS NULL OR status = $1 ORDER BY version DESC", status)))
    if as_json:
        out.print_json(json.dumps([dict(r) for r in rows], default=str))
    else:
        out.print(_adapter_table(rows))


@adapters_app.command("show")
def adapters_show(version: Annotated[str, typer.Argument(help="v7, 7 or flywheel:v7.")],
                  as_json: JsonOption = False) -> None:
    """One adapter: lineage, metrics and its events."""
    from service.adapters.store import get
    from service.feedback.routes import parse_adapter

    number = parse_adapter(version, "version")

    async def fetch(conn):
        return await get(conn, number), await conn.fetch(
            "SELECT from_status, to_status, actor, reason, at FROM adapter_events WHERE version = $1 ORDER BY id",
            number)

    row, events = run_async(with_database(fetch))
    if row is None:
        raise CommandError(f"no adapter v{number}")
    if as_json:
        out.print_json(json.dumps({**dict(row), "events": [dict(e) for e in events]}, default=str))
        return
    out.print(_adapter_table([row]))
    out.print_json(json.dumps(row["metrics"], default=str))
    events_table = Table("at", "from", "to", "actor", "reason")
    for e in events:
        events_table.add_row(f"{e['at']:%Y-%m-%d %H:%M:%S}", e["from_status"] or "", e["to_status"], e["actor"],
                             e["reason"] or "")
    out.print(events_table)


def _operate(operation: str, version: str | None, reason: str | None, percent: int | None = None) -> None:
    import redis.asyncio as aioredis

    from service.adapters import registry
    from service.adapters.events import publish
    from service.feedback.routes import parse_adapter

    number = parse_adapter(version, "version") if version else None

    async def go(conn):
        async with conn.transaction():
            row = await registry.run_operation(conn, operation, number, actor="cli", reason=reason, percent=percent)
        client = aioredis.from_url(settings().redis_url)
        try:
            await publish(client, {"operation": operation, "version": row["version"] if row else None})
        finally:
            await client.aclose()
        return row

    row = run_async(with_database(go))
    out.print(f"{operation}: " + (f"v{row['version']} is now {row['status']}" if row else "the base model serves"))


Reason = Annotated[str | None, typer.Option(help="Why; kept in the adapter's events.")]
Version = Annotated[str, typer.Argument(help="v7, 7 or flywheel:v7.")]


@adapters_app.command("promote")
def adapters_promote(version: Version, reason: Reason = None) -> None:
    """Make a version production (the current one retires and stays the rollback target)."""
    _operate("promote", version, reason)


@adapters_app.command("canary")
def adapters_canary(version: Version, percent: Annotated[int, typer.Option(min=1, max=50)] = 10,
                    reason: Reason = None) -> None:
    """Serve a version to a stable share of callers."""
    _operate("canary", version, reason, percent)


@adapters_app.command("rollback")
def adapters_rollback(reason: Reason = None) -> None:
    """Production back to the previous version (or the base)."""
    _operate("rollback", None, reason)


@adapters_app.command("retire")
def adapters_retire(version: Version, reason: Reason = None) -> None:
    """Take a version out of service."""
    _operate("retire", version, reason)


@adapters_app.command("reject")
def adapters_reject(version: Version, reason: Reason = None) -> None:
    """Reject a candidate or end a canary."""
    _operate("reject", version, reason)




@adapters_app.command("import")
def adapters_import(path: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder trained elsewhere.")],
                    name: Annotated[str | None, typer.Option(help="Its name in the registry (default: the folder's "
                                                                    "name).")] = None,
                    reason: Reason = None, as_json: JsonOption = False) -> None:
    """Register an adapter as a candidate: checked against the base model, checksummed, copied into the adapter dir."""
    from service.adapters.files import AdapterFilesError
    from service.adapters.imports import import_adapter

    folder = path.resolve()
    try:
        row = run_async(with_database(lambda conn: import_adapter(conn, settings(), folder, name=name or folder.name,
                                                                  actor="cli", reason=reason)))
    except AdapterFilesError as exc:
        raise CommandError(str(exc)) from exc
    if as_json:
        out.print_json(json.dumps(dict(row), default=str))
    else:
        out.print(f"imported {path} as v{row['version']} ({row['name']}), a candidate: "
                  f"`flywheel adapters canary {row['version']}` or `promote {row['version']}` to serve it")
