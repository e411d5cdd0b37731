"""Hot-swap across replicas: two real service processes on one database and a Redis of their own (so it can be
restarted), adapters imported through the CLI, and live traffic while production changes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from service.auth import hash_key
from service.embedded import EmbeddedRedis
from tests.conftest import _admin, _fresh_database, make_lora_adapter, with_database
from tests.integration.service_process import ServiceProcess, child_env

pytestmark = pytest.mark.slow
ADMIN_KEY = "test-swap-admin-" + uuid.uuid4().hex
RECONCILE_S = 2
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
QUESTION = [{"role": "user", "content": "Name a fruit."}]


class Cluster:
    def __init__(self, env, redis: EmbeddedRedis, tmp):
        self.env, self.redis, self.tmp = env, redis, tmp
        self.a = ServiceProcess(env, tmp / "swap-a.log").start()
        self.b = ServiceProcess(env, tmp / "swap-b.log").start()
        self.versions: list[int] = []

    def import_adapter(self, folder, name: str) -> int:
        result = self.a.cli("adapters", "import", str(folder), "--name", name, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["version"]

    def operate(self, path: str, **body) -> httpx.Response:
        return httpx.post(f"{self.a.url}/api/adapters/{path}", json=body or None, headers=ADMIN, timeout=120)


@pytest.fixture(scope="module")
def cluster(postgres_server_url, template_database, model_dir, default_model, lora_adapters, shared_tmp):
    name = _fresh_database(postgres_server_url, template_database)
    redis = EmbeddedRedis(shared_tmp / f"{name}-redis")
    env = child_env(FLYWHEEL_DATABASE_URL=with_database(postgres_server_url, name), FLYWHEEL_REDIS_URL=redis.start(),
                    FLYWHEEL_MODEL_DIR=str(model_dir), FLYWHEEL_DATA_DIR=str(shared_tmp / name),
                    FLYWHEEL_ADMIN_KEY=ADMIN_KEY, FLYWHEEL_RATE_LIMIT_PER_MIN="0",
                    FLYWHEEL_RECONCILE_S=str(RECONCILE_S),
                    OMP_NUM_THREADS="1")  # two model processes on a small machine: no thread oversubscription
    cluster = Cluster(env, redis, shared_tmp)
    third = make_lora_adapter(default_model, shared_tmp / f"{name}-third", seed=7)
    cluster.versions = [cluster.import_adapter(folder, f"swap-{i}")
                        for i, folder in enumerate([*lora_adapters, third])]
    yield cluster
    for process in (cluster.a, cluster.b):
        process.stop()
    redis.stop()
    asyncio.run(_admin(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _ready(process: ServiceProcess) -> httpx.Response:
    return httpx.get(f"{process.url}/ready", timeout=10)


def _wait_production(process: ServiceProcess, version: int | None, within: float = 30) -> float:
    """Seconds until ``process`` serves ``version`` as production."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if _ready(process).json()["serving"]["production"] == version:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{process.url} still serves {_ready(process).json()['serving']}, not v{version}")


def _set_production(cluster: Cluster, version: int) -> None:
    """Make ``version`` production whatever the current state (tests in this module share one registry)."""
    current = _ready(cluster.a).json()["serving"]["production"]
    if current != version:
        response = cluster.operate(f"{version}/promote", reason="test setup")
        assert response.status_code == 200, response.text
    _wait_production(cluster.a, version)
    _wait_production(cluster.b, version)


def test_imported_adapters_are_candidates_with_copied_files(cluster):
    rows = httpx.get(f"{cluster.a.url}/api/adapters", headers=ADMIN).json()["data"]
    imported = {row["version"]: row for row in rows}
    for version in cluster.versions:
        row = imported[version]
        assert row["status"] == "candidate" and row["algorithm"] == "import"
        assert row["path"] == os.path.join(cluster.env["FLYWHEEL_DATA_DIR"], "adapters", str(version))


async def test_zero_failed_requests_while_swapping_under_load(cluster):
    v1, v2, _ = cluster.versions
    _set_production(cluster, v1)
    stop = asyncio.Event()
    outcomes: list[tuple[str, float, set[str], str | None]] = []  # (process, started, models streamed, finish)

    async def client(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=120) as http:
            while not stop.is_set():
                started, models, finish = time.monotonic(), set(), None
                async with http.stream("POST", "/v1/chat/completions", json={
                        "model": "flywheel", "messages": QUESTION, "max_tokens": 12, "stream": True}) as response:
                    if response.status_code != 200:
                        outcomes.append((url, started, {f"HTTP {response.status_code}"}, None))
                        continue
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            models.add(chunk["model"])
                            finish = chunk["choices"][0]["finish_reason"] if chunk["choices"] else finish
                outcomes.append((url, started, models, finish))

    async def requests_since(moment: float, count: int = 2) -> None:
        """Until every process has finished ``count`` requests that started after ``moment``."""
        deadline = time.monotonic() + 120
        while any(sum(1 for url, started, _, _ in outcomes if url == p.url and started > moment) < count
                  for p in (cluster.a, cluster.b)):
            assert time.monotonic() < deadline, (
                f"no progress since {moment:.1f}: {[(u[-5:], round(t, 1), m, f) for u, t, m, f in outcomes[-8:]]}\n"
                + cluster.a.log_path.read_text()[-3000:] + "\n----\n" + cluster.b.log_path.read_text()[-3000:])
            await asyncio.sleep(0.1)

    clients = [asyncio.create_task(client(p.url)) for p in (cluster.a, cluster.b) for _ in range(3)]
    async with httpx.AsyncClient(base_url=cluster.a.url, headers=ADMIN, timeout=120) as operator:
        await requests_since(0)
        for path, expected in ((f"{v2}/promote", v2), ("rollback", v1), (f"{v2}/promote", v2)):
            response = await operator.post(f"/api/adapters/{path}")  # while streams are running
            assert response.status_code == 200, response.text
            for process in (cluster.a, cluster.b):
                await asyncio.to_thread(_wait_production, process, expected)
            await requests_since(time.monotonic())
    stop.set()
    await asyncio.gather(*clients)

    failed = [o for o in outcomes if o[3] not in ("stop", "length")]
    assert not failed, failed
    assert all(len(models) == 1 for _, _, models, _ in outcomes)  # a request ends on the version it started with
    for process in (cluster.a, cluster.b):
        seen = set().union(*(models for url, _, models, _ in outcomes if url == process.url))
        assert seen == {f"flywheel:v{v1}", f"flywheel:v{v2}"}, seen
    metrics = httpx.get(f"{cluster.b.url}/metrics").text
    assert f'flywheel_serving_version{{alias="production"}} {float(v2)}' in metrics
    assert "flywheel_adapter_load_seconds_count" in metrics


def test_a_process_started_after_a_promote_comes_up_serving_it(cluster):
    _, v2, _ = cluster.versions
    _set_production(cluster, v2)
    late = ServiceProcess(cluster.env, cluster.tmp / "swap-late.log").start()
    try:
        assert _ready(late).json()["serving"]["production"] == v2
        reply = httpx.post(f"{late.url}/v1/chat/completions", headers=ADMIN, timeout=60,
                           json={"model": "flywheel", "messages": QUESTION, "max_tokens": 2})
        assert reply.json()["model"] == f"flywheel:v{v2}"
    finally:
        late.stop()


def test_a_promote_after_a_redis_restart_reaches_every_process_by_reconcile(cluster):
    v1, v2, _ = cluster.versions
    _set_production(cluster, v1)
    cluster.redis.stop()
    reply = httpx.post(f"{cluster.b.url}/v1/chat/completions", headers=ADMIN, timeout=60,
                       json={"model": "flywheel", "messages": QUESTION, "max_tokens": 2})
    assert reply.status_code == 200  # Redis holds no data: serving goes on without it
    cluster.redis.start()
    promoted = cluster.operate(f"{v2}/promote", reason="after a Redis restart")
    assert promoted.status_code == 200 and promoted.json()["serving"]["production"] == v2
    # B's subscription broke with the restart, so the event may be lost; the periodic reconcile must heal it.
    assert _wait_production(cluster.b, v2, within=4 * RECONCILE_S + 10) <= 4 * RECONCILE_S + 10


def test_corrupt_files_are_refused_and_the_current_version_keeps_serving(cluster):
    v1, v2, v3 = cluster.versions
    _set_production(cluster, v1)
    weights = Path(cluster.env["FLYWHEEL_DATA_DIR"], "adapters", str(v3), "adapter_model.safetensors")
    original = weights.read_bytes()
    try:
        with open(weights, "r+b") as handle:  # flip bytes in the middle of the weights
            handle.seek(len(original) // 2)
            handle.write(b"\xff" * 64)
        refused = cluster.operate(f"{v3}/promote")
        assert refused.status_code == 409 and "checksum" in refused.json()["detail"]
        assert _ready(cluster.a).json()["serving"]["production"] == v1

        # Files that break after the registry's check: B is paused while v3 is promoted, then finds them corrupt.
        weights.write_bytes(original)
        os.kill(cluster.b.process.pid, signal.SIGSTOP)
        try:
            assert cluster.operate(f"{v3}/promote").status_code == 200
            with open(weights, "r+b") as handle:
                handle.seek(len(original) // 2)
                handle.write(b"\xff" * 64)
        finally:
            os.kill(cluster.b.process.pid, signal.SIGCONT)
        deadline = time.monotonic() + 4 * RECONCILE_S + 10
        while time.monotonic() < deadline and _ready(cluster.b).status_code == 200:
            time.sleep(0.2)
        ready = _ready(cluster.b)
        assert ready.status_code == 503 and ready.json()["checks"]["adapters"] == f"error: v{v3} cannot be loaded"
        assert ready.json()["serving"]["production"] == v1  # B keeps what it served
        reply = httpx.post(f"{cluster.b.url}/v1/chat/completions", headers=ADMIN, timeout=60,
                           json={"model": "flywheel", "messages": QUESTION, "max_tokens": 2})
        assert reply.json()["model"] == f"flywheel:v{v1}"
        assert "checksum" in ready.json()["adapter_load_errors"][f"v{v3}"]
        metrics = httpx.get(f"{cluster.b.url}/metrics").text
        failures = re.search(r"^flywheel_adapter_load_failures_total (\S+)$", metrics, re.M)
        assert failures and float(failures.group(1)) >= 1
        events = httpx.get(f"{cluster.a.url}/api/adapters/{v3}", headers=ADMIN).json()["events"]
        assert any(e["reason"].startswith("load failed") for e in events if e["reason"])
    finally:
        weights.write_bytes(original)
    # Once the files are whole again, B loads v3 on its next reconcile and is ready.
    _wait_production(cluster.b, v3, within=4 * RECONCILE_S + 10)
    assert _ready(cluster.b).status_code == 200


async def test_the_canary_goes_to_a_stable_share_of_callers(cluster, lora_adapters):
    v1 = cluster.versions[0]
    _set_production(cluster, v1)
    v2 = cluster.import_adapter(lora_adapters[1], "swap-canary")  # a fresh candidate (the others were live)
    canary = cluster.operate(f"{v2}/canary", percent=50)
    assert canary.status_code == 200, canary.text
    for process in (cluster.a, cluster.b):
        deadline = time.monotonic() + 30
        while _ready(process).json()["serving"]["canary"] != v2 and time.monotonic() < deadline:
            time.sleep(0.1)
    keys = [f"fw-swap-{uuid.uuid4().hex}" for _ in range(24)]
    conn = await asyncpg.connect(cluster.env["FLYWHEEL_DATABASE_URL"])
    try:
        await conn.executemany("INSERT INTO api_keys (name, role, key_hash, key_prefix) VALUES ($1, 'user', $2, $3)",
                               [(f"caller-{i}", hash_key(k), k[:8]) for i, k in enumerate(keys)])
    finally:
        await conn.close()

    async def version_for(http: httpx.AsyncClient, key: str, url: str) -> str:
        reply = await http.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                                json={"model": "flywheel", "messages": QUESTION, "max_tokens": 1})
        return reply.json()["model"]

    async with httpx.AsyncClient(timeout=60) as http:
        first = await asyncio.gather(*(version_for(http, k, cluster.a.url) for k in keys))
        again = await asyncio.gather(*(version_for(http, k, cluster.b.url) for k in keys))
    assert first == again  # each caller sees one version, whichever process answers
    in_canary = first.count(f"flywheel:v{v2}")
    assert set(first) == {f"flywheel:v{v1}", f"flywheel:v{v2}"} and 4 <= in_canary <= 20
    assert cluster.operate(f"{v2}/reject").status_code == 200
    for process in (cluster.a, cluster.b):  # an ended canary is unloaded everywhere; production stays
        deadline = time.monotonic() + 4 * RECONCILE_S + 10
        while f"v{v2}" in _ready(process).json()["loaded_adapters"] and time.monotonic() < deadline:
            time.sleep(0.2)
        loaded = _ready(process).json()["loaded_adapters"]
        assert f"v{v2}" not in loaded and f"v{v1}" in loaded
