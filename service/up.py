"""`flywheel up`: the whole product on one machine, supervised by one process.

Order of start: the base model (fetched once when the default is used), PostgreSQL and Redis (configured, found at
the defaults, or embedded), the schema, then the API, worker and UI as child processes pointed at those backends.
Ctrl-C or SIGTERM stops the children in reverse order, then the embedded backends. If a child dies, everything
stops and the exit status says so: a half-running product is worse than a stopped one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx

from service import db
from service.auth import Role, create_key, key_is_valid
from service.embedded import Backends
from service.settings import DEFAULT_MODEL_NAME, Settings

START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 30


async def _prepare_database(url: str, key_file: Path) -> str:
    """Migrate, and return the development admin key kept in ``key_file`` (made on first start)."""
    await db.ensure_database(url)
    conn = await asyncpg.connect(url)
    try:
        await db.migrate(conn)
        if key_file.is_file() and await key_is_valid(conn, key := key_file.read_text().strip()):
            return key
        _, key = await create_key(conn, "flywheel-up admin", Role.admin)
    finally:
        await conn.close()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600)
    key_file.write_text(key + "\n")
    return key


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def run_up(settings: Settings, embedded: str, with_ui: bool, with_worker: bool, say: Callable[[str], None]) -> int:
    """Run until interrupted; return the exit status."""
    started = time.monotonic()
    if settings.model.base_model is None:
        from service.engine.weights import fetch_default_model

        fetch_default_model(settings.model_dir / DEFAULT_MODEL_NAME, progress=say)
    if with_ui and importlib.util.find_spec("gradio") is None:
        say("the UI is skipped: it needs the `ui` extra (pip install 'flywheel[ui]')")
        with_ui = False

    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Backends(settings, embedded) as backends:
            if backends.embedded:
                say(f"embedded {' and '.join(backends.embedded)} under {settings.data_dir}")
            admin_key = asyncio.run(_prepare_database(backends.database_url, settings.data_dir / "admin-key"))
            env = {**os.environ, **backends.env()}
            wanted = [("api", "serve"), ("worker", "worker") if with_worker else None,
                      ("ui", "ui") if with_ui else None]
            children: dict[str, subprocess.Popen] = {}
            try:  # the children stop before the backends they use
                for name, command in filter(None, wanted):
                    # Own process group: Ctrl-C reaches only us, and we stop the children in order.
                    children[name] = subprocess.Popen([sys.executable, "-m", "service.cli", command], env=env,
                                                      process_group=0)
                return _supervise(settings, children, with_ui, started, lambda: stopping, say, admin_key)
            finally:
                _stop_children(children)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(settings, children, with_ui, started, stopping, say, admin_key: str) -> int:
    probes = {"api": f"{settings.api_url}/health"}
    if with_ui:
        probes["ui"] = f"http://127.0.0.1:{settings.server.ui_port}/"
    status = _wait_healthy(children, probes, stopping)
    if status is not None:
        return status
    urls = f"API {settings.api_url}" + (f", UI http://127.0.0.1:{settings.server.ui_port}" if with_ui else "")
    say(f"Flywheel is up in {time.monotonic() - started:.1f} s: {urls}. Ctrl-C stops it.")
    say(f"Admin API key (kept in {settings.data_dir / 'admin-key'}): {admin_key}")
    while not stopping():
        for name, child in children.items():
            if child.poll() is not None:
                say(f"{name} exited with status {child.returncode}; stopping everything")
                return 1
        time.sleep(0.2)
    say("stopping")
    return 0


def _wait_healthy(children: dict[str, subprocess.Popen], probes: dict[str, str], stopping: Callable[[], bool]):
    """None once every probe answers 200; an exit status if a child died or we were interrupted first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = dict(probes)
    while pending:
        if stopping():
            return 130
        for name, child in children.items():
            if child.poll() is not None:
                print(f"flywheel: error: {name} exited with status {child.returncode} during start", file=sys.stderr)
                return 1
        if time.monotonic() > deadline:
            print(f"flywheel: error: {', '.join(pending)} not healthy after {START_TIMEOUT_S} s", file=sys.stderr)
            return 1
        pending = {name: url for name, url in pending.items() if not _healthy(url)}
        if pending:
            time.sleep(0.2)
    return None


def _stop_children(children: dict[str, subprocess.Popen]) -> None:
    for child in reversed(list(children.values())):
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in children.values():
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
