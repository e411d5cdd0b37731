"""Hot-swap benchmark: two service processes under steady streaming load while production changes.

It starts two ``flywheel serve`` processes on their own database (--database-url's server, database
``flywheel_swap_bench``, recreated) and the Redis at --redis-url, imports two random LoRA adapters with
``flywheel adapters import``, and keeps --clients streaming clients busy (half on each process, model ``flywheel``).
Then, one after another: promote v1, promote v2, roll back (to v1), promote v2 again, roll back again.

For each operation it reports the swap time: from sending the operator's request until every process serves the
new production (each process's ``/ready`` polled every 10 ms). The baseline is the adapter's bare load time on the
same engine under the same load: ``POST /v1/load_lora_adapter`` of a third adapter on each process, timed from request
to answer (digest, read, load). Target: the median cold swap (the version was not loaded yet; a rollback finds its
target kept loaded, a warm swap) <= 1.5x the median load. Every request must succeed (target 0
failed) and each stream must be served by one version from start to end.

Prints a table, writes JSON to bench/results/swap-<UTC timestamp>.json (or --out); exits 1 on any failed request.
Run: ``python bench/swap.py`` (PostgreSQL and Redis running; the default model fetched).
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
from serve import PROMPTS, format_table, make_adapters  # bench/serve.py, importable when this file runs as a script

from service.embedded import free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ADMIN_KEY = "fw-swap-bench-admin"
DATABASE = "flywheel_swap_bench"


class Replica:
    """A ``flywheel`` process (``serve`` unless ``command`` says otherwise) on a free port, logging to ``log``."""

    def __init__(self, env: dict, log: Path, command: tuple[str, ...] = ("serve",)):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")  # noqa: SIM115 - open while the process runs
        self.process = subprocess.Popen([sys.executable, "-m", "service.cli", *command],
                                        env={**env, "FLYWHEEL_PORT": str(self.port)}, stdout=self.log,
                                        stderr=subprocess.STDOUT)

    async def wait_ready(self, http: httpx.AsyncClient, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"service exited; see {self.log.name}")
            try:
                if (await http.get(f"{self.url}/ready")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
        sys.exit(f"service not ready after {timeout} s; see {self.log.name}")

    async def production(self, http: httpx.AsyncClient) -> int | None:
        return (await http.get(f"{self.url}/ready")).json()["serving"]["production"]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def stream(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[set[str], str | None]:
    """One streamed reply: the model names its chunks carried, and an error (None when it finished normally)."""
    body = {"model": "flywheel", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True}
    models, finish = set(), None
    try:
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
            if response.status_code != 200:
                return models, f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    models.add(chunk["model"])
                    if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                        finish = chunk["choices"][0]["finish_reason"]
    except httpx.HTTPError as exc:
        return models, f"{type(exc).__name__}: {exc}"
    return models, None if finish in ("stop", "length") else f"finish_reason {finish}"


async def until_all_serve(http: httpx.AsyncClient, replicas: list[Replica], version: int | None,
                          started: float) -> float:
    pending = set(range(len(replicas)))
    while pending:
        for i in list(pending):
            if await replicas[i].production(http) == version:
                pending.discard(i)
        if time.perf_counter() - started > 120:
            sys.exit(f"not every process serves v{version} after 120 s")
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


async def benchmark(args, env: dict, adapters: list[Path]) -> dict:
    replicas = [Replica(env, RESULTS_DIR / f"swap-replica-{i}.log") for i in range(2)]
    outcomes: list[tuple[str, set[str], str | None]] = []
    stop = asyncio.Event()
    try:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=200)) as http:
            for replica in replicas:
                await replica.wait_ready(http)
            versions = []
            for i, folder in enumerate(adapters[:2]):
                imported = subprocess.run([sys.executable, "-m", "service.cli", "adapters", "import", str(folder),
                                           "--name", f"swap-bench-{i}", "--json"], env=env, capture_output=True,
                                          text=True)
                if imported.returncode:
                    sys.exit(f"import failed: {imported.stderr.strip()}")
                versions.append(json.loads(imported.stdout)["version"])

            async def client(index: int) -> None:
                replica = replicas[index % len(replicas)]
                j = 0
                while not stop.is_set():
                    models, error = await stream(http, replica.url, PROMPTS[(index + j) % len(PROMPTS)],
                                                 args.max_tokens)
                    outcomes.append((replica.url, models, error))
                    j += 1

            clients = [asyncio.create_task(client(i)) for i in range(args.clients)]
            await asyncio.sleep(args.settle_s)
            loads = []
            for replica in replicas:  # the baseline: a bare load on the same engine, same load
                started = time.perf_counter()
                response = await http.post(f"{replica.url}/v1/load_lora_adapter",
                                           headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                                           json={"lora_name": "swap-bench-load", "lora_path": str(adapters[2])})
                response.raise_for_status()
                loads.append(time.perf_counter() - started)
                await http.post(f"{replica.url}/v1/unload_lora_adapter", json={"lora_name": "swap-bench-load"},
                                headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                await asyncio.sleep(args.settle_s)
            v1, v2 = versions
            swaps, served = [], set()  # a cold swap loads the version; a warm one finds it kept loaded
            for operation, expected in ((f"{v1}/promote", v1), (f"{v2}/promote", v2), ("rollback", v1),
                                        (f"{v2}/promote", v2), ("rollback", v1)):
                started = time.perf_counter()
                response = await http.post(f"{replicas[0].url}/api/adapters/{operation}",
                                           headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                response.raise_for_status()
                swaps.append({"operation": operation, "to": expected, "cold": expected not in served,
                              "swap_s": await until_all_serve(http, replicas, expected, started)})
                served.add(expected)
                await asyncio.sleep(args.settle_s)
            stop.set()
            await asyncio.gather(*clients)
    finally:
        for replica in replicas:
            replica.stop()
    return {"versions": versions, "loads_s": loads, "swaps": swaps, "outcomes": outcomes}


async def fresh_database(server_url: str, name: str = DATABASE) -> str:
    """The URL of database ``name`` on ``server_url``'s server, dropped and created empty."""
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a database on the PostgreSQL server to use (the bench makes its own database there)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients, half per process")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens every request generates")
    parser.add_argument("--settle-s", type=float, default=3.0, help="seconds of load before and between operations")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads per process (OMP_NUM_THREADS): the cores shared between the two")
    parser.add_argument("--base-model", type=Path, default=Path("~/.cache/flywheel/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/swap-<UTC timestamp>.json)")
    args = parser.parse_args()
    created = datetime.now(UTC)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)

    adapters = make_adapters(args.base_model.expanduser(), RESULTS_DIR / "adapters")
    database_url = asyncio.run(fresh_database(args.database_url))
    shutil.rmtree(RESULTS_DIR / "swap-data", ignore_errors=True)  # adapters of the database just dropped
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_DATABASE_URL=database_url, FLYWHEEL_REDIS_URL=args.redis_url, FLYWHEEL_ADMIN_KEY=ADMIN_KEY,
               FLYWHEEL_RATE_LIMIT_PER_MIN="0", FLYWHEEL_DATA_DIR=str(RESULTS_DIR / "swap-data"),
               FLYWHEEL_BASE_MODEL=str(args.base_model.expanduser()), OMP_NUM_THREADS=str(args.threads))
    result = asyncio.run(benchmark(args, env, adapters))

    outcomes = result.pop("outcomes")
    failed = [error for _, _, error in outcomes if error]
    mixed = sum(1 for _, models, error in outcomes if not error and len(models) != 1)
    load_s = statistics.median(result["loads_s"])
    cold_s = statistics.median(s["swap_s"] for s in result["swaps"] if s["cold"])
    rows = [[s["operation"], f"v{s['to']}", "cold" if s["cold"] else "warm", s["swap_s"] * 1000]
            for s in result["swaps"]]
    rows += [[f"bare load, process {i}", "", "", t * 1000] for i, t in enumerate(result["loads_s"])]
    print(format_table(["step", "serves", "swap", "ms"], rows))
    within = cold_s <= 1.5 * load_s
    checks = [["median cold swap / median load", cold_s / load_s, "<= 1.5", "PASS" if within else "FAIL"],
              ["failed requests", len(failed), "0", "PASS" if not failed else "FAIL"],
              ["streams served by two versions", mixed, "0", "PASS" if not mixed else "FAIL"],
              ["requests completed", len(outcomes), "", ""]]
    print()
    print(format_table(["check", "value", "target", "result"], checks))
    for error, count in sorted({e: failed.count(e) for e in failed}.items()):
        print(f"  x{count}: {error}")
    out = args.out or RESULTS_DIR / f"swap-{created:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({"created_utc": created.isoformat(), "settings": {
        k: getattr(args, k) for k in ("clients", "max_tokens", "settle_s", "threads")}, **result,
        "requests": len(outcomes), "failed": len(failed), "mixed_version_streams": mixed,
        "cold_swap_over_load": cold_s / load_s}, indent=2) + "\n")
    print(f"\nwrote {out}")
    sys.exit(1 if failed or mixed else 0)


if __name__ == "__main__":
    main()
