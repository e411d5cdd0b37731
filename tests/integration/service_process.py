"""Run `flywheel serve` as a real process for tests, on its own database and a free port."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from service.embedded import free_port
from tests.conftest import _admin, _fresh_database, with_database


class ServiceProcess:
    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "FLYWHEEL_PORT": str(self.port)}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120, until: str = "/ready") -> ServiceProcess:
        """Start and wait until ``until`` answers 200 (``/health`` for a process expected to be not ready)."""
        self.log = open(self.log_path, "w")  # noqa: SIM115 - stays open for the process's lifetime
        self.process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], env=self.env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}{until}", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"service not ready: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=120)

    def new_key(self, name: str, role: str = "user") -> str:
        result = self.cli("keys", "create", "--name", name, "--role", role)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]


def child_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return {**env, **values}


@contextmanager
def service_on_fresh_database(postgres_server_url: str, template: str, shared_tmp: Path,
                              **env: str) -> Iterator[ServiceProcess]:
    """A started service on a database cloned from the template (dropped afterwards), with ``env`` added."""
    name = _fresh_database(postgres_server_url, template)
    database_url = with_database(postgres_server_url, name)
    process = ServiceProcess(child_env(FLYWHEEL_DATABASE_URL=database_url, FLYWHEEL_DATA_DIR=str(shared_tmp / name),
                                       **env), shared_tmp / f"{name}.log").start()
    process.database_url = database_url
    try:
        yield process
    finally:
        process.stop()
        asyncio.run(_admin(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
