"""The adapter lifecycle: allowed and forbidden moves, serialised promotions, rollbacks, and processes switching."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from service import db
from service.adapters import registry
from service.errors import Conflict, NotFound
from tests.conftest import checksummed_files
from tests.integration.conftest import ADMIN_KEY
from tests.integration.service_process import ServiceProcess


@pytest.fixture
async def pool(database_url):
    pool = await db.create_pool(database_url, 8)
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    return checksummed_files(tmp_path_factory.mktemp("adapter"))


async def _candidates(pool, n: int, files) -> list[int]:
    return [await pool.fetchval("INSERT INTO adapters (name, base_model, algorithm, status, path, sha256, size_bytes) "
                                "VALUES ($1, 'base', 'sft', 'candidate', $2, $3, $4) RETURNING version",
                                f"c{i}", *files) for i in range(n)]


async def _in_tx(pool, operation, *args, **kwargs):
    async with pool.acquire() as conn, conn.transaction():
        return await operation(conn, *args, actor="op", reason="test", **kwargs)


async def test_allowed_and_forbidden_transitions(pool, adapter_files):
    v1, v2, v3 = await _candidates(pool, 3, adapter_files)
    await _in_tx(pool, registry.promote, v1)
    await _in_tx(pool, registry.start_canary, v2, 10)
    with pytest.raises(Conflict, match="in canary already"):
        await _in_tx(pool, registry.start_canary, v3, 10)
    await _in_tx(pool, registry.reject, v2)
    with pytest.raises(Conflict, match="rejected; it cannot become production") as refused:
        await _in_tx(pool, registry.promote, v2)
    assert refused.value.extra == {"current_status": "rejected"}
    with pytest.raises(Conflict, match="already production"):
        await _in_tx(pool, registry.promote, v1)
    with pytest.raises(NotFound):
        await _in_tx(pool, registry.promote, 999)
    training = await pool.fetchval("INSERT INTO adapters (name, base_model, algorithm) VALUES ('t', 'b', 'sft') "
                                   "RETURNING version")
    with pytest.raises(Conflict, match="training; it cannot become production"):
        await _in_tx(pool, registry.promote, training)
    events = await pool.fetch("SELECT version, from_status, to_status FROM adapter_events ORDER BY id")
    assert [(e["version"], e["from_status"], e["to_status"]) for e in events] == [
        (v1, "candidate", "production"), (v2, "candidate", "canary"), (v2, "canary", "rejected")]


async def test_concurrent_promotions_leave_exactly_one_production(pool, adapter_files):
    versions = await _candidates(pool, 6, adapter_files)
    await asyncio.gather(*(_in_tx(pool, registry.promote, v) for v in versions))
    statuses = await pool.fetch("SELECT status FROM adapters")
    assert sorted(r["status"] for r in statuses) == ["production"] + ["retired"] * 5
    promotions = await pool.fetchval("SELECT count(*) FROM adapter_events WHERE to_status = 'production'")
    assert promotions == 6  # every call succeeded, one after the other


async def test_rollback_returns_to_the_previous_production_then_to_the_base(pool, adapter_files):
    v1, v2 = await _candidates(pool, 2, adapter_files)
    await _in_tx(pool, registry.promote, v1)
    await _in_tx(pool, registry.promote, v2)
    back = await _in_tx(pool, registry.rollback)
    assert back["version"] == v1
    assert await pool.fetchval("SELECT status FROM adapters WHERE version = $1", v2) == "rolled_back"
    assert await _in_tx(pool, registry.rollback) is None  # v1 had no predecessor: the base serves
    assert await pool.fetchval("SELECT count(*) FROM adapters WHERE status = 'production'") == 0
    with pytest.raises(Conflict, match="nothing to roll back"):
        await _in_tx(pool, registry.rollback)


def _serving(process: ServiceProcess) -> dict:
    return httpx.get(f"{process.url}/ready", timeout=10).json()["serving"]


def _wait_serving(process: ServiceProcess, production, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _serving(process)["production"] != production:
        assert time.monotonic() < deadline, f"{process.url} still serves {_serving(process)}"
        time.sleep(0.1)


@pytest.mark.slow
def test_operators_promote_and_roll_back_and_every_process_follows(service, lora_adapters, shared_tmp):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=service.url, headers=admin, timeout=120) as client:
        version = client.post("/v1/load_lora_adapter", json={"lora_name": "registry-a",
                                                              "lora_path": str(lora_adapters[0])}).json()["version"]
        second = ServiceProcess(service.env, shared_tmp / "second-service.log").start()
        try:
            user = service.new_key("not-an-operator")
            assert client.post(f"/api/adapters/{version}/promote",
                               headers={"Authorization": f"Bearer {user}"}).status_code == 403
            assert client.post("/api/adapters/99999/promote").status_code == 404
            promoted = client.post(f"/api/adapters/{version}/promote", json={"reason": "looks good"})
            assert promoted.status_code == 200, promoted.text
            assert promoted.json()["serving"]["production"] == version  # this process switched before answering
            reply = client.post("/v1/chat/completions", json={
                "model": "flywheel", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            assert reply.json()["model"] == f"flywheel:v{version}"
            _wait_serving(second, version)  # the other process follows the event

            again = client.post(f"/api/adapters/{version}/promote")
            assert again.status_code == 409 and again.json()["current_status"] == "production"
            assert client.post("/api/adapters/rollback").json()["serving"]["production"] is None
            _wait_serving(second, None)
            shown = client.get(f"/api/adapters/{version}").json()
            assert shown["status"] == "rolled_back"
            assert [e["to_status"] for e in shown["events"]][-2:] == ["production", "rolled_back"]
            assert [a["version"] for a in client.get("/api/adapters", params={"status": "rolled_back"}).json()
                    ["data"]] == [version]
        finally:
            second.stop()


async def test_the_cli_runs_the_same_operations(pool, database_url, redis_url, adapter_files):
    import json
    import os
    import subprocess
    import sys

    v1, v2 = await _candidates(pool, 2, adapter_files)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_DATABASE_URL=database_url, FLYWHEEL_REDIS_URL=redis_url, COLUMNS="200")

    def flywheel(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", "adapters", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    assert flywheel("promote", f"v{v1}", "--reason", "first").returncode == 0
    assert flywheel("canary", str(v2), "--percent", "20").returncode == 0
    listed = {a["version"]: a for a in json.loads(flywheel("list", "--json").stdout)}
    assert listed[v1]["status"] == "production" and listed[v2]["canary_percent"] == 20
    refused = flywheel("promote", f"v{v1}")
    assert refused.returncode == 2 and refused.stderr.startswith("flywheel: error: adapter v")
    assert "Traceback" not in refused.stderr
    shown = json.loads(flywheel("show", f"flywheel:v{v1}", "--json").stdout)
    assert shown["events"][0]["reason"] == "first" and shown["events"][0]["actor"] == "cli"
    assert flywheel("rollback").returncode == 0
    assert await pool.fetchval("SELECT status FROM adapters WHERE version = $1", v1) == "rolled_back"
