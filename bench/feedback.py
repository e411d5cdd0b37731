"""Feedback ingest benchmark: thumbs through the API against raw asyncpg INSERTs into the same table.

For each --clients value N, on the database of --database-url (which must be the service's own):

* ``N clients, API``: N concurrent clients, each with its own user key, send ``PUT /api/messages/{id}/feedback``
  thumbs, one request at a time, each on a distinct assistant message of the client's own conversation (so every
  write is an insert; --requests in all);
* ``N clients, raw``: N connections of an asyncpg pool, each inserting its share of the same number of thumbs with
  ``INSERT INTO feedback ...`` on a separate set of assistant messages made the same way.

The bench makes its keys, conversations and messages directly in the database (generating replies would be far too
slow), warms both paths up with --warmup writes per client (not counted), and deletes everything it made at the end
unless --keep. It reports acknowledged rows/s (2xx answers; completed INSERTs), latency p50/p99 and a count of the
rows found against the writes acknowledged, then checks: API/raw rows/s >= 0.40, API p99 < 50 ms (the target is set
for 64 clients; it is checked at every N) and 0 lost writes. Writes JSON to bench/results/feedback-<UTC
timestamp>.json (or --out). Exits 1 if any write failed or was lost.

Run: a service with FLYWHEEL_RATE_LIMIT_PER_MIN=0 (rate limits would answer 429), then
``python bench/feedback.py --url http://127.0.0.1:8000 --database-url postgresql://...``.
"""

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx

from service.auth import Role, create_key

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RAW_INSERT = "INSERT INTO feedback (message_id, owner, kind, value) VALUES ($1, $2, 'thumb', $3)"


@dataclass
class Write:
    latency_s: float
    error: str | None = None


@dataclass
class Scenario:
    name: str
    clients: int
    path: str  # "api" or "raw"
    writes: list[Write]
    wall_s: float
    message_ids: list[uuid.UUID] = field(default_factory=list)  # the measured writes' messages
    found: int = 0  # feedback rows on those messages after the run

    def summary(self) -> dict:
        ok = [w.latency_s * 1000 for w in self.writes if w.error is None]
        return {"scenario": self.name, "requests": len(self.writes), "acknowledged": len(ok), "wall_s": self.wall_s,
                "rows_per_s": len(ok) / self.wall_s if self.wall_s > 0 else 0.0, "p50_ms": percentile(ok, 50),
                "p99_ms": percentile(ok, 99), "rows_found": self.found, "lost": max(len(ok) - self.found, 0),
                "errors": len(self.writes) - len(ok)}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain-text table: first column left-aligned, the rest right-aligned; floats to 2 places, None as '-'."""
    def cell(value) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
    cells = [headers] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def make_messages(conn: asyncpg.Connection, owners: list[int], counts: list[int],
                        conversations: list[uuid.UUID]) -> list[list[uuid.UUID]]:
    """Per owner: a conversation (appended to conversations), a user message and counts[i] assistant replies to it;
    returns the reply ids per owner."""
    convs = [uuid.uuid4() for _ in owners]
    records = [(c, o, "bench") for c, o in zip(convs, owners, strict=True)]
    await conn.copy_records_to_table("conversations", records=records, columns=["id", "owner", "title"])
    conversations.extend(convs)
    records, replies = [], []
    for conv, count in zip(convs, counts, strict=True):
        question = uuid.uuid4()
        records.append((question, conv, None, "user", "bench question", None))
        replies.append([uuid.uuid4() for _ in range(count)])
        records += [(r, conv, question, "assistant", "bench answer", 1) for r in replies[-1]]
    await conn.copy_records_to_table("messages", records=records, columns=[
        "id", "conversation_id", "parent_id", "role", "content", "completion_tokens"])
    return replies


async def put_thumb(client: httpx.AsyncClient, key: str, message_id: uuid.UUID, value: int) -> Write:
    start = time.perf_counter()
    try:
        response = await client.put(f"/api/messages/{message_id}/feedback", json={"kind": "thumb", "value": value},
                                    headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as exc:
        return Write(time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - start
    if response.status_code == 429:
        return Write(elapsed, "HTTP 429: run the service with FLYWHEEL_RATE_LIMIT_PER_MIN=0")
    if response.status_code == 200:  # every message is new, so this replaced an earlier thumb: a bench bug
        return Write(elapsed, "HTTP 200 (replaced) where 201 (new) was expected")
    if response.status_code != 201:
        return Write(elapsed, f"HTTP {response.status_code}: {response.text[:200]}")
    return Write(elapsed)


async def insert_thumb(conn: asyncpg.Connection, owner: int, message_id: uuid.UUID, value: int) -> Write:
    start = time.perf_counter()
    try:
        await conn.execute(RAW_INSERT, message_id, owner, value)
    except (asyncpg.PostgresError, OSError) as exc:
        return Write(time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
    return Write(time.perf_counter() - start)


async def run_api(url: str, keys: list[str], messages: list[list[uuid.UUID]], warmup: int,
                  one_pool: bool) -> Scenario:
    """One client per key, each rating its messages in turn: the first warmup ones unmeasured, then the rest."""
    n = len(keys)
    async with contextlib.AsyncExitStack() as stack:
        pools = [await stack.enter_async_context(httpx.AsyncClient(
            base_url=url, timeout=httpx.Timeout(60, connect=10), limits=httpx.Limits(max_connections=size)))
            for size in ([n] if one_pool else [1] * n)]

        async def loop(i: int, ids: list[uuid.UUID]) -> list[Write]:
            client = pools[i % len(pools)]
            return [await put_thumb(client, keys[i], m, 1 if j % 2 else -1) for j, m in enumerate(ids)]

        warm = await asyncio.gather(*(loop(i, ids[:warmup]) for i, ids in enumerate(messages)))
        errors = [w.error for ws in warm for w in ws if w.error]
        if errors:
            sys.exit(f"API warm-up failed ({len(errors)} errors), first: {errors[0]}\n(is the service at {url} "
                     "using --database-url, with FLYWHEEL_RATE_LIMIT_PER_MIN=0?)")
        start = time.perf_counter()
        done = await asyncio.gather(*(loop(i, ids[warmup:]) for i, ids in enumerate(messages)))
        wall = time.perf_counter() - start
    return Scenario(f"{n} clients, API", n, "api", [w for ws in done for w in ws], wall,
                    [m for ids in messages for m in ids[warmup:]])


async def run_raw(database_url: str, owners: list[int], messages: list[list[uuid.UUID]], warmup: int) -> Scenario:
    """One pool connection per owner, each inserting thumbs on its messages in turn, warmup ones first."""
    n = len(owners)
    async with asyncpg.create_pool(database_url, min_size=n, max_size=n) as pool:
        async def loop(owner: int, ids: list[uuid.UUID], ready: asyncio.Barrier) -> tuple[list[Write], float]:
            async with pool.acquire() as conn:
                for j, m in enumerate(ids[:warmup]):
                    await insert_thumb(conn, owner, m, 1 if j % 2 else -1)
                await ready.wait()
                start = time.perf_counter()
                return [await insert_thumb(conn, owner, m, 1 if j % 2 else -1)
                        for j, m in enumerate(ids[warmup:])], start

        ready = asyncio.Barrier(n)
        done = await asyncio.gather(*(loop(o, ids, ready) for o, ids in zip(owners, messages, strict=True)))
        wall = time.perf_counter() - min(start for _, start in done)
    return Scenario(f"{n} clients, raw", n, "raw", [w for ws, _ in done for w in ws], wall,
                    [m for ids in messages for m in ids[warmup:]])


async def benchmark(args: argparse.Namespace, run_id: str) -> list[Scenario]:
    """Make the keys, then per N: the two sets of messages, the API run, the raw run, and the count check."""
    try:
        async with httpx.AsyncClient(base_url=args.url, timeout=10) as client:
            ready = await client.get("/ready")
    except httpx.HTTPError as exc:
        sys.exit(f"cannot reach the service at {args.url}: {exc}")
    if ready.status_code != 200:
        sys.exit(f"the service at {args.url} is not ready: HTTP {ready.status_code}: {ready.text[:200]}")
    conn = await asyncpg.connect(args.database_url)
    key_ids: list[int] = []
    conversations: list[uuid.UUID] = []
    scenarios = []
    try:
        keys = []
        for i in range(max(args.clients)):
            key_id, key = await create_key(conn, f"bench-feedback-{run_id}-{i}", Role.user)
            key_ids.append(key_id)
            keys.append(key)
        for n in args.clients:
            counts = [args.warmup + args.requests // n + (i < args.requests % n) for i in range(n)]
            api_messages = await make_messages(conn, key_ids[:n], counts, conversations)
            raw_messages = await make_messages(conn, key_ids[:n], counts, conversations)
            print(f"running {n} clients ...", file=sys.stderr)
            pair = [await run_api(args.url, keys[:n], api_messages, args.warmup, args.one_pool),
                    await run_raw(args.database_url, key_ids[:n], raw_messages, args.warmup)]
            for scenario in pair:
                scenario.found = await conn.fetchval("SELECT count(*) FROM feedback WHERE message_id = ANY($1)",
                                                     scenario.message_ids)
            scenarios += pair
    finally:
        if not args.keep:
            async with conn.transaction():
                await conn.execute("DELETE FROM feedback WHERE owner = ANY($1)", key_ids)
                await conn.execute("DELETE FROM messages WHERE conversation_id = ANY($1)", conversations)
                await conn.execute("DELETE FROM conversations WHERE id = ANY($1)", conversations)
                await conn.execute("DELETE FROM api_keys WHERE id = ANY($1)", key_ids)
        await conn.close()
    return scenarios


def checks(scenarios: list[Scenario]) -> list[dict]:
    """Per N: API/raw rows/s >= 0.40, API p99 < 50 ms and no lost writes; n/a where a side had errors."""
    rows = {(s.clients, s.path): s.summary() for s in scenarios}
    out = []
    for n in dict.fromkeys(s.clients for s in scenarios):
        api, raw = rows[(n, "api")], rows[(n, "raw")]
        ratio = api["rows_per_s"] / raw["rows_per_s"] if not (api["errors"] or raw["errors"]) and raw[
            "rows_per_s"] else None
        lost = api["lost"] + raw["lost"]
        for name, value, target, passed in [
                (f"API/raw rows/s, {n} clients", ratio, ">= 0.40", ratio is not None and ratio >= 0.40),
                (f"API p99 ms, {n} clients", api["p99_ms"], "< 50", api["p99_ms"] is not None and api["p99_ms"] < 50),
                (f"lost writes, {n} clients", lost, "0", lost == 0)]:
            out.append({"check": name, "value": value, "target": target,
                        "result": "n/a" if value is None else "PASS" if passed else "FAIL"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    parser.add_argument("--database-url", help="the service's database (default: $FLYWHEEL_DATABASE_URL, else "
                        "postgresql://postgres@127.0.0.1:5432/flywheel)",
                        default=os.environ.get("FLYWHEEL_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/flywheel"))
    parser.add_argument("--clients", default="16,64", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=2000, help="measured writes per scenario, over all clients")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured writes per client before each scenario")
    parser.add_argument("--one-pool", action="store_true", help="share one httpx pool of N connections among the "
                        "clients instead of one client each (httpcore's pool then costs the bench O(N) CPU a request)")
    parser.add_argument("--keep", action="store_true", help="keep the bench's keys, messages and feedback")
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/feedback-<UTC timestamp>.json)")
    args = parser.parse_args()
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients must be comma-separated integers, not {args.clients!r}")
    if min(args.clients) < 1 or args.requests < 1 or args.warmup < 0:
        parser.error("--clients and --requests must be positive, --warmup not negative")
    created, run_id = datetime.now(UTC), secrets.token_hex(4)

    scenarios = asyncio.run(benchmark(args, run_id))
    rows = [s.summary() for s in scenarios]
    check_rows = checks(scenarios)
    errors = Counter((s.name, w.error) for s in scenarios for w in s.writes if w.error)
    lost = sum(row["lost"] for row in rows)

    print(format_table(["scenario", "requests", "acked", "wall s", "rows/s", "p50 ms", "p99 ms", "rows found",
                        "lost", "errors"], [list(row.values()) for row in rows]))
    print()
    print(format_table(["check", "value", "target", "result"], [list(row.values()) for row in check_rows]))
    if errors:
        print("\nerrors:")
        for (name, error), count in errors.items():
            print(f"  [{name}] x{count}: {error}")

    out = args.out or RESULTS_DIR / f"feedback-{created:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"url": args.url, "clients": args.clients, "requests": args.requests, "warmup": args.warmup,
                "run_id": run_id, "kept": args.keep}
    report = {"created_utc": created.isoformat(), "settings": settings, "scenarios": rows, "checks": check_rows,
              "errors": [{"scenario": name, "error": error, "count": count} for (name, error), count in errors.items()]}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    sys.exit(1 if errors or lost else 0)


if __name__ == "__main__":
    main()
