"""Fixtures for browser tests: a real `flywheel serve` on the default model, `flywheel ui` pointed at it, and
Debian's headless Chromium driven by Playwright. Screenshots go to tests/artifacts/browser/ (git-ignored)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import httpx
import pytest

from service.embedded import free_port
from tests.integration.service_process import service_on_fresh_database

ADMIN_KEY = "browser-admin-key-" + uuid.uuid4().hex
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
REPLY_TOKENS = 12  # short replies keep a chat round trip to seconds on a 2-core CPU
EXPECT_TIMEOUT_MS = 15_000  # Playwright's 5 s default is too short for a busy 2-core machine


@pytest.fixture(autouse=True, scope="session")
def patient_expectations():
    from playwright.sync_api import expect

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)


@pytest.fixture(scope="session")
def service(postgres_server_url, template_database, redis_url, model_dir, default_model, shared_tmp):
    with service_on_fresh_database(postgres_server_url, template_database, shared_tmp, FLYWHEEL_REDIS_URL=redis_url,
                                   FLYWHEEL_MODEL_DIR=str(model_dir), FLYWHEEL_ADMIN_KEY=ADMIN_KEY,
                                   FLYWHEEL_MAX_TOKENS_DEFAULT=str(REPLY_TOKENS),
                                   FLYWHEEL_AUTO_ROLLOUT="false") as process:
        yield process


@pytest.fixture(scope="session")
def ui_url(service, shared_tmp):
    """`flywheel ui` as a separate process that reaches the service over HTTP only, as it would remotely."""
    port = free_port()
    env = {**service.env, "FLYWHEEL_API_URL": service.url, "FLYWHEEL_DATA_DIR": str(shared_tmp / "ui"),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    log_path = shared_tmp / "ui.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "ui", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the UI did not start: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(20)


@pytest.fixture
def page(ui_url):
    """A fresh browser on the UI (its own Gradio session).

    Playwright's sync API runs an event loop in this thread while it is started, which breaks every later
    `asyncio.run` (other tests' fixtures included); so it starts and stops with each test (about a second).
    """
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"browser tests need Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(ui_url, wait_until="domcontentloaded")
        yield page
        browser.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def query(database_url: str, sql: str, *args) -> list[asyncpg.Record]:
    """Run one query. Playwright's sync API keeps an event loop running in this thread, so asyncpg gets its own."""
    async def run():
        conn = await asyncpg.connect(database_url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, run()).result()


def sign_in(page, key: str, name: str) -> None:
    page.locator("#api-key input").fill(key)
    page.locator("#sign-in").click()
    from playwright.sync_api import expect

    expect(page.locator("#signed-in")).to_contain_text(f"Signed in as {name}", timeout=15_000)
