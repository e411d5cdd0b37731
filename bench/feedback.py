"""Feedback ingest benchmark: thumbs through the API against raw asyncpg INSERTs into the same table.

For each --clients value N, on the database of --database-url (which must be the service's own):

* ``N clients, API``: N concurrent clients, each with its own user key and HTTP/1.1 keep-alive connection, send
  ``PUT /api/messages/{id}/feedback`` thumbs in turn, each on a distinct assistant message of the client's own
  conversation, so every write is an insert (--requests in all);
* ``N clients, raw``: N connections of an asyncpg pool, each inserting its share of as many thumbs with
  ``INSERT INTO feedback ...`` on a separate set of assistant messages made the same way.

Both paths are driven from this one process and event loop (uvloop when installed, as the service uses), with the
same concurrency and the same per-write timing. The API clients use bench/http1.py, a minimal keep-alive client:
on a 2-core machine the load generator shares the CPU with the service, and httpx spent more CPU per request than
the service did, so it measured itself; the raw path's client (asyncpg) is just as lean.

The bench makes its keys, conversations and messages directly in the database (generating replies would be far too
slow), warms both paths up with --warmup writes per client (not counted), and deletes all it made unless --keep.
It reports acknowledged rows/s (201 answers; completed INSERTs), latency p50/p99 and the rows found against the
writes acknowledged, then checks: API/raw rows/s >= 0.40, API p99 < 50 ms (the target is set for 64 clients and
checked at every N) and 0 lost writes. Writes JSON to bench/results/feedback-<UTC timestamp>.json (or --out).
Exits 1 if any write failed or was lost.

Run: a service with FLYWHEEL_RATE_LIMIT_PER_MIN=0 (rate limits would answer 429), then
``python bench/feedback.py --url http://127.0.0.1:8000 --database-url postgresql://...``.
"""

import argparse
import asyncio
import json
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
from http1 import Connection  # bench/http1.py and bench/serve.py, importable when this file runs as a script
from serve import format_table, percentile

from service.auth import Role, create_key

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is not on every platform
    uvloop = None

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/flywheel"
RAW_INSERT = "INSERT INTO feedback (message_id, owner, kind, value) VALUES ($1, $2, 'thumb', $3)"
NO_RATE_LIMIT = "run the service with FLYWHEEL_RATE_LIMIT_PER_MIN=0"


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


async def make_messages(conn: asyncpg.Connection, owners: list[int], counts: list[int],
                        conversations: list[uuid.UUID]) -> list[list[uuid.UUID]]:
    """Per owner, a conversation (added to conversations) with a user message and counts[i] assistant replies to
    it; returns the replies' ids per owner."""
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


async def put_thumb(conn: Connection, key: str, message_id: uuid.UUID, value: int) -> Write:
    """One timed PUT; anything but 201 is an error (200 would mean it replaced a thumb: no message is rated twice).
    TimeoutError is an OSError."""
    start, error = time.perf_counter(), None
    try:
        async with asyncio.timeout(60):  # a stuck service fails the write instead of hanging the bench
            response = await conn.request("PUT", f"/api/messages/{message_id}/feedback",
                                          headers={"authorization": f"Bearer {key}"},
                                          body=b'{"kind":"thumb","value":%d}' % value)
        if response.status != 201:
            hint = f" ({NO_RATE_LIMIT})" if response.status == 429 else ""
            error = f"HTTP {response.status}{hint}: {response.text[:200]}"
    except (OSError, asyncio.IncompleteReadError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Write(time.perf_counter() - start, error)


async def insert_thumb(conn: asyncpg.Connection, owner: int, message_id: uuid.UUID, value: int) -> Write:
    start, error = time.perf_counter(), None
    try:
        await conn.execute(RAW_INSERT, message_id, owner, value)
    except (asyncpg.PostgresError, OSError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return Write(time.perf_counter() - start, error)


def check_warmup(name: str, writes: list[list[Write]], hint: str) -> None:
    errors = [w.error for ws in writes for w in ws if w.error]
    if errors:
        sys.exit(f"{name} warm-up failed ({len(errors)} errors), first: {errors[0]}\n({hint})")


async def run_api(url: str, keys: list[str], messages: list[list[uuid.UUID]], warmup: int) -> Scenario:
    """Client i rates messages[i] in turn with keys[i] on a connection of its own: the first warmup ones
    unmeasured, then the rest."""
    n = len(keys)
    connections = [Connection(url) for _ in range(n)]

    async def loop(i: int, ids: list[uuid.UUID]) -> list[Write]:
        return [await put_thumb(connections[i], keys[i], m, 1 if j % 2 else -1) for j, m in enumerate(ids)]

    try:
        warm = await asyncio.gather(*(loop(i, ids[:warmup]) for i, ids in enumerate(messages)))
        check_warmup("API", warm, f"is the service at {url} on --database-url, with FLYWHEEL_RATE_LIMIT_PER_MIN=0?")
        start = time.perf_counter()
        done = await asyncio.gather(*(loop(i, ids[warmup:]) for i, ids in enumerate(messages)))
        wall = time.perf_counter() - start
    finally:
        for connection in connections:
            connection.close()
    return Scenario(f"{n} clients, API", n, "api", [w for ws in done for w in ws], wall,
                    [m for ids in messages for m in ids[warmup:]])


async def run_raw(database_url: str, owners: list[int], messages: list[list[uuid.UUID]], warmup: int) -> Scenario:
    """Connection i inserts thumbs on messages[i] as owners[i] in turn, warmup ones first; all start together."""
    n, ready = len(owners), asyncio.Barrier(len(owners))
    try:
        pool = await asyncpg.create_pool(database_url, min_size=n, max_size=n)
    except asyncpg.TooManyConnectionsError as exc:
        sys.exit(f"cannot open {n} raw connections beside the service's pool: {exc}")
    async with pool:
        async def loop(i: int, ids: list[uuid.UUID]) -> tuple[list[Write], list[Write], float]:
            async with pool.acquire() as conn:
                warm = [await insert_thumb(conn, owners[i], m, 1 if j % 2 else -1) for j, m in enumerate(ids[:warmup])]
                await ready.wait()
                start = time.perf_counter()
                return warm, [await insert_thumb(conn, owners[i], m, 1 if j % 2 else -1)
                              for j, m in enumerate(ids[warmup:])], start

        done = await asyncio.gather(*(loop(i, ids) for i, ids in enumerate(messages)))
        wall = time.perf_counter() - min(start for _, _, start in done)
    check_warmup("raw INSERT", [warm for warm, _, _ in done], "is the schema migrated?")
    return Scenario(f"{n} clients, raw", n, "raw", [w for _, ws, _ in done for w in ws], wall,
                    [m for ids in messages for m in ids[warmup:]])


async def benchmark(args: argparse.Namespace, run_id: str) -> list[Scenario]:
    """Make the keys, then per N: the two sets of messages, the API run, the raw run and the row counts."""
    probe = Connection(args.url)
    try:
        ready = await asyncio.wait_for(probe.request("GET", "/ready"), 10)
    except (OSError, asyncio.IncompleteReadError) as exc:
        sys.exit(f"cannot reach the service at {args.url}: {exc!r}")
    finally:
        probe.close()
    if ready.status != 200:
        sys.exit(f"the service at {args.url} is not ready: HTTP {ready.status}: {ready.text[:200]}")
    conn = await asyncpg.connect(args.database_url)
    key_ids, keys, conversations, scenarios = [], [], [], []
    try:
        for i in range(max(args.clients)):
            key_id, key = await create_key(conn, f"bench-feedback-{run_id}-{i}", Role.user)
            key_ids.append(key_id)
            keys.append(key)
        for n in args.clients:
            counts = [args.warmup + args.requests // n + (i < args.requests % n) for i in range(n)]
            api_messages = await make_messages(conn, key_ids[:n], counts, conversations)
            raw_messages = await make_messages(conn, key_ids[:n], counts, conversations)
            print(f"running {n} clients ...", file=sys.stderr)
            pair = [await run_api(args.url, keys[:n], api_messages, args.warmup),
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
    """Per N: API/raw rows/s >= 0.40 (n/a if either side had errors), API p99 < 50 ms, no lost writes."""
    rows = {(s.clients, s.path): s.summary() for s in scenarios}
    out = []
    for n in dict.fromkeys(s.clients for s in scenarios):
        api, raw = rows[(n, "api")], rows[(n, "raw")]
        clean = not (api["errors"] or raw["errors"]) and raw["rows_per_s"] > 0
        ratio = api["rows_per_s"] / raw["rows_per_s"] if clean else None
        p99, lost = api["p99_ms"], api["lost"] + raw["lost"]
        for name, value, target, passed in [
                (f"API/raw rows/s, {n} clients", ratio, ">= 0.40", ratio is not None and ratio >= 0.40),
                (f"API p99 ms, {n} clients", p99, "< 50", p99 is not None and p99 < 50),
                (f"lost writes, {n} clients", lost, "0", lost == 0)]:
            out.append({"check": name, "value": value, "target": target,
                        "result": "n/a" if value is None else "PASS" if passed else "FAIL"})
    return out


def run(coroutine):
    """Run on uvloop when installed (it comes with uvicorn[standard], as the service runs): the same loop drives
    both paths."""
    return uvloop.run(coroutine) if uvloop else asyncio.run(coroutine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    parser.add_argument("--database-url", default=os.environ.get("FLYWHEEL_DATABASE_URL", DEFAULT_DATABASE_URL),
                        help=f"the service's database (default: $FLYWHEEL_DATABASE_URL, else {DEFAULT_DATABASE_URL})")
    parser.add_argument("--clients", default="16,64", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=2000, help="measured writes per scenario, over all clients")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured writes per client before each scenario")
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

    scenarios = run(benchmark(args, run_id))
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
    settings = {key: getattr(args, key) for key in ("url", "clients", "requests", "warmup", "keep")}
    settings["event_loop"] = "uvloop" if uvloop else "asyncio"
    report = {"created_utc": created.isoformat(), "run_id": run_id, "settings": settings, "scenarios": rows,
              "checks": check_rows,
              "errors": [{"scenario": name, "error": error, "count": count} for (name, error), count in errors.items()]}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    sys.exit(1 if errors or lost else 0)


if __name__ == "__main__":
    main()
