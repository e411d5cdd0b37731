"""Training benchmark on CPU: seconds per step per algorithm and dtype, and trigger-to-candidate time for 64 items.

* Steps: for each algorithm (sft, dpo, kto) and dtype (float32, bfloat16), ``worker.train.train_adapter`` trains a
  fresh LoRA on --base-model for --steps steps at --batch-size and --max-length, on synthetic rows: 16 everyday
  prompts, each with a concise answer and a rambling ~90-word non-answer (SFT: the concise answers; DPO: concise
  over ramble; KTO: both, labelled). Each pair runs in a fresh subprocess of this script (``--one ALG DTYPE
  --json``) so its peak RSS (ru_maxrss, process-wide) is its own. Seconds per step is the mean gap between
  consecutive step reports, which leaves the first (warm-up) step out. "moved" is how far the optimised quantity
  went from the first logged step to the last, positive when it learned: loss drop for SFT, rewards/margins gain
  for DPO and KTO. A second table sets bfloat16 against float32 per algorithm: speed-up and what each learned.
* Cycle: on a scratch database (--database-url, created and migrated here, dropped at the end unless --keep) and
  Redis (--redis-url), 8 keys own 32 conversations whose prompt has a short answer thumbed up and a rambling one
  thumbed down (edited instead on the last 8): 64 feedback items. One ``Worker.cycle()`` (FLYWHEEL_TRAIN_MIN_NEW
  =32, algorithm auto) is timed from the trigger check to the registered adapter. Target: under 600 s.

Writes JSON to bench/results/train-<UTC timestamp>.json (or --out), with the load average at the end (other work on
the machine slows every step). Exits 1 if a measurement failed or the run did not succeed.
Run: ``python bench/train.py`` (tens of minutes on 2 CPU cores; it never touches the network).
"""

import argparse
import asyncio
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from serve import format_table  # bench/serve.py, importable when this file runs as a script

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCRATCH = Path("/tmp/bench-train")
DATA_DIR = SCRATCH / "data"  # the worker's FLYWHEEL_DATA_DIR: its adapters
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/flywheel_benchtrain"
TARGET_S = 600.0
FINE = {"loss_first", "loss_last", "margin_first", "margin_last", "moved", "fp32_moved", "bf16_moved"}  # 4 places
QA = [
    ("What is the capital of France?", "Paris."), ("How do I boil an egg?", "Simmer it for 9 minutes, then cool it."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red."),
    ("How many minutes are in a day?", "1,440 minutes."), ("What is a good name for a pet cat?", "Try Miso."),
    ("How do I make a cup of tea?", "Steep a tea bag in just-boiled water for 3 minutes."),
    ("Why do leaves change colour in autumn?", "Chlorophyll breaks down, revealing yellow and red pigments."),
    ("How can I sleep better at night?", "Keep a fixed bedtime and skip screens before bed."),
    ("What are three uses for baking soda?", "Baking, cleaning and deodorising."),
    ("What is a healthy breakfast?", "Oats with fruit and yoghurt."), ("Why do cats purr?", "Mostly to show content."),
    ("What is the tallest mountain in the world?", "Mount Everest, 8,849 m."),
    ("What should I pack for a weekend hike?", "Water, snacks, a map, layers and a first-aid kit."),
    ("How does a bicycle stay upright?", "Steering and speed keep its wheels under it."),
    ("What is the difference between weather and climate?", "Weather is daily; climate is the long-run average."),
    ("What is 15 percent of 200?", "30."),
]
RAMBLE = ("Well, that is a really interesting question, and honestly there are so many ways to think about it. People "
          "have wondered about things like {q!r} for a very long time, and everyone seems to have an opinion. Some "
          "say one thing, others say something else entirely, and it depends on your point of view, your background "
          "and perhaps even on the weather today. I could talk about it for hours. In the end it is the kind of "
          "thing you have to decide for yourself, so I would rather not give you a direct answer right now.")


def synthetic_data():
    from worker.data import Split, TrainingData

    def turn(role: str, text: str) -> list[dict]:
        return [{"role": role, "content": text}]

    rows = [(turn("user", q), turn("assistant", a), turn("assistant", RAMBLE.format(q=q))) for q, a in QA]
    return TrainingData(sft=Split([{"messages": u + good} for u, good, _ in rows]),
                        dpo=Split([{"prompt": u, "chosen": good, "rejected": bad} for u, good, bad in rows]),
                        kto=Split([{"prompt": u, "completion": c, "label": c is good} for u, good, bad in rows
                                   for c in (good, bad)]))


def measure_one(args: argparse.Namespace, algorithm: str, dtype: str) -> dict:
    """Train one (algorithm, dtype) in this process; timings, first/last loss and margins, peak RSS."""
    from worker.train import TrainConfig, train_adapter

    reports: list[tuple[float, dict]] = []

    def on_progress(p: dict) -> None:  # the end-of-training log repeats the last step without "loss"
        if "loss" in p and (not reports or reports[-1][1]["step"] != p["step"]):
            reports.append((time.perf_counter(), p))

    config = TrainConfig(algorithm=algorithm, max_steps=args.steps, batch_size=args.batch_size,
                         max_length=args.max_length, dtype=dtype)
    out_dir = SCRATCH / f"one-{algorithm}-{dtype}-{os.getpid()}"
    try:
        result = train_adapter(config, synthetic_data(), str(args.base_model), out_dir, on_progress=on_progress)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    gaps = [b[0] - a[0] for a, b in zip(reports, reports[1:], strict=False)]
    first, last = (reports[0][1], reports[-1][1]) if reports else ({}, {})
    key = "loss" if algorithm == "sft" else "rewards/margins"
    moved = (last[key] - first[key]) * (-1 if algorithm == "sft" else 1) if key in first and key in last else None
    return {"algorithm": algorithm, "dtype": dtype, "steps": len(reports),
            "s_per_step": sum(gaps) / len(gaps) if gaps else None, "train_s": result.seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss_first": first.get("loss"), "loss_last": last.get("loss"),
            "margin_first": first.get("rewards/margins"), "margin_last": last.get("rewards/margins"), "moved": moved}


def run_one(args: argparse.Namespace, algorithm: str, dtype: str) -> dict:
    """measure_one in a fresh subprocess; its JSON is the last line of its stdout."""
    print(f"training {algorithm} {dtype} ...", file=sys.stderr)
    proc = subprocess.run([sys.executable, __file__, "--one", algorithm, dtype, "--json", "--steps", str(args.steps),
                           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                           "--base-model", str(args.base_model)], capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout.strip():
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return {"algorithm": algorithm, "dtype": dtype, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}


def compare_dtypes(rows: list[dict]) -> list[dict]:
    """Per algorithm with both dtypes measured: bf16 speed-up over fp32 and what each moved."""
    by = {(r["algorithm"], r["dtype"]): r for r in rows if "error" not in r}
    out = []
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        if not (fp := by.get((algorithm, "float32"))) or not (bf := by.get((algorithm, "bfloat16"))):
            continue
        speedup = fp["s_per_step"] / bf["s_per_step"] if fp["s_per_step"] and bf["s_per_step"] else None
        ok = fp["moved"] is not None and bf["moved"] is not None
        out.append({"algorithm": algorithm, "fp32_s_per_step": fp["s_per_step"], "bf16_s_per_step": bf["s_per_step"],
                    "bf16_speedup": speedup, "fp32_moved": fp["moved"], "bf16_moved": bf["moved"],
                    "bf16_learned_less": None if not ok else "yes" if bf["moved"] < fp["moved"] else "no"})
    return out


def cells(row: dict) -> list:
    """A row's table cells: losses, margins and moves to 4 places (2 would hide what bfloat16 moved)."""
    return [f"{v:.4f}" if k in FINE and v is not None else v for k, v in row.items()]


async def seed(conn: asyncpg.Connection, owners: int = 8) -> int:
    """8 keys, 32 conversations (the 16 prompts twice, worded apart); 64 feedback items on their answers."""
    from service.auth import Role, create_key

    keys = [(await create_key(conn, f"bench-train-{i}", Role.user))[0] for i in range(owners)]
    prompts = [(q, a) for q, a in QA] + [(f"In one sentence: {q[0].lower()}{q[1:]}", a) for q, a in QA]
    convs, messages, feedback = [], [], []
    for i, (q, a) in enumerate(prompts):
        (conv, question, short, ramble), owner = (uuid.uuid4() for _ in range(4)), keys[i % owners]
        convs.append((conv, owner, "bench"))
        messages += [(question, conv, None, "user", q), (short, conv, question, "assistant", a),
                     (ramble, conv, question, "assistant", RAMBLE.format(q=q))]
        feedback.append((short, owner, "thumb", 1, None))
        # the last rambles, one per owner so that the owner cap keeps them all, are edited rather than thumbed down
        edit = i >= len(prompts) - owners
        feedback.append((ramble, owner, "edit", None, a) if edit else (ramble, owner, "thumb", -1, None))
    await conn.copy_records_to_table("conversations", records=convs, columns=["id", "owner", "title"])
    await conn.copy_records_to_table("messages", records=messages,
                                     columns=["id", "conversation_id", "parent_id", "role", "content"])
    await conn.executemany("INSERT INTO feedback (message_id, owner, kind, value, content) VALUES ($1, $2, $3, $4, $5)",
                           feedback)
    return len(feedback)


async def cycle_bench(args: argparse.Namespace) -> dict:
    """Scratch database, seeded feedback, one timed Worker.cycle(); the run's and its adapter's rows."""
    import redis.asyncio as aioredis

    from service import db
    from service.settings import Settings
    from worker.loop import LOCK_KEY, Worker

    created = await db.ensure_database(args.database_url)
    conn = await asyncpg.connect(args.database_url)
    await db.migrate(conn)
    if not created and await conn.fetchval("SELECT count(*) FROM feedback"):
        await conn.close()
        raise RuntimeError(f"{args.database_url} already holds feedback: drop it or pass another --database-url")
    pool, redis = await db.create_pool(args.database_url, 4), aioredis.from_url(args.redis_url)
    try:
        if await redis.exists(LOCK_KEY):
            raise RuntimeError(f"{LOCK_KEY} is held in {args.redis_url}: is a worker using it? use another --redis-url")
        items = await seed(conn)
        settings = Settings.from_env({
            "FLYWHEEL_DATABASE_URL": args.database_url, "FLYWHEEL_REDIS_URL": args.redis_url,
            "FLYWHEEL_DATA_DIR": str(DATA_DIR), "FLYWHEEL_BASE_MODEL": str(args.base_model),
            "FLYWHEEL_TRAIN_MIN_NEW": "32", "FLYWHEEL_TRAIN_ALGORITHM": "auto"})
        print(f"running Worker.cycle() on {items} feedback items ...", file=sys.stderr)
        start = time.perf_counter()
        run_id = await Worker(settings, pool, redis).cycle()
        seconds = time.perf_counter() - start
        if run_id is None:
            raise RuntimeError(f"Worker.cycle() started no run on {items} feedback items")
        row = await pool.fetchrow(
            "SELECT r.id AS run_id, r.status AS run_status, r.error AS run_error, r.counts, a.version AS adapter, "
            "a.status AS verdict, a.metrics FROM training_runs r LEFT JOIN adapters a ON a.run_id = r.id "
            "WHERE r.id = $1 ORDER BY a.version DESC LIMIT 1", run_id)
    finally:
        await conn.close()
        await redis.aclose()
        await pool.close()
        if not args.keep:  # a scratch database: drop it, connected to the server's postgres database
            parts = urlsplit(args.database_url)
            admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
            name = parts.path.lstrip("/").replace('"', '""')
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
            shutil.rmtree(DATA_DIR, ignore_errors=True)
    return {"items": items, "seconds": seconds, **dict(row), "metrics": row["metrics"] or {}}


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", type=Path, default=Path("~/.cache/flywheel/models/SmolLM2-135M-Instruct"),
                        help="local transformers folder of the base model")
    parser.add_argument("--steps", type=int, default=6, help="training steps per (algorithm, dtype); the first is "
                        "warm-up, so at least 2")
    parser.add_argument("--batch-size", type=int, default=4, help="rows (DPO: pairs) per step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row")
    parser.add_argument("--algorithms", default="sft,dpo,kto", help="comma-separated algorithms to time")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated training dtypes")
    parser.add_argument("--skip-steps", action="store_true", help="skip the per-step measurements")
    parser.add_argument("--skip-cycle", action="store_true", help="skip the 64-item Worker.cycle() measurement")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="scratch database, created and dropped")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="Redis for the worker's lock")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database and adapter files")
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/train-<UTC timestamp>.json)")
    parser.add_argument("--one", nargs=2, metavar=("ALG", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.base_model = args.base_model.expanduser()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is warm-up")
    if not (args.base_model / "config.json").is_file():
        sys.exit(f"{args.base_model} is not a local model folder (run `flywheel model fetch-default`)")
    SCRATCH.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.one:
        print(json.dumps(measure_one(args, *args.one)))
        return
    created = datetime.now(UTC)

    pairs = [(a, d) for a in args.algorithms.split(",") for d in args.dtypes.split(",")]
    rows = [] if args.skip_steps else [run_one(args, a, d) for a, d in pairs]
    measured, failed = [r for r in rows if "error" not in r], [r for r in rows if "error" in r]
    dtype_rows = compare_dtypes(rows)
    cycle, cycle_error = None, None
    try:  # a failure here must not lose the step measurements
        cycle = None if args.skip_cycle else asyncio.run(cycle_bench(args))
    except Exception as exc:
        cycle_error = f"{type(exc).__name__}: {exc}"

    if measured:
        print(format_table(["algorithm", "dtype", "steps", "s/step", "train s", "peak RSS MiB", "loss first",
                            "loss last", "margin first", "margin last", "moved"], [cells(r) for r in measured]))
        print("\nmoved: loss drop (sft) or rewards/margins gain (dpo, kto) from the first logged step to the last. "
              "Both dtypes\nsee the same batches in the same order (seed 0): compare moved across dtypes.\n")
    if dtype_rows:
        print(format_table(["algorithm", "fp32 s/step", "bf16 s/step", "bf16 speed-up", "fp32 moved", "bf16 moved",
                            "bf16 learned less"], [cells(r) for r in dtype_rows]))
        print()
    checks = []
    if cycle:
        # A gate-passing adapter is a candidate, or already a canary when FLYWHEEL_AUTO_ROLLOUT is on.
        ok = cycle["run_status"] == "succeeded" and cycle["verdict"] in ("candidate", "canary", "rejected")
        checks.append({"check": f"trigger -> registered adapter, {cycle['items']} items (s)",
                       "value": cycle["seconds"], "target": f"< {TARGET_S:.0f}",
                       "result": "PASS" if ok and cycle["seconds"] < TARGET_S else "FAIL"})
        m = cycle["metrics"]
        print(format_table(["run", "status", "stages (steps)", "train s", "adapter", "verdict", "accuracy", "KL"],
                           [[cycle["run_id"], cycle["run_status"], " ".join(f"{s['algorithm']}({s['steps']})" for s in
                             m.get("stages", [])), m.get("train_seconds"), cycle["adapter"], cycle["verdict"],
                             m.get("candidate_accuracy"), m.get("kl_from_base")]]))
        print(f"\ncounts: {cycle['counts']}\ngate: {m.get('gate_reasons') or cycle['run_error'] or 'passed'}\n")
        print(format_table(["check", "value", "target", "result"], [list(c.values()) for c in checks]))
    for r in failed:
        print(f"\n{r['algorithm']} {r['dtype']} failed: {r['error']}")
    if cycle_error:
        print(f"\nWorker.cycle() measurement failed: {cycle_error}")

    out = args.out or RESULTS_DIR / f"train-{created:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    hidden = ("one", "json", "out", "database_url", "redis_url")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in hidden}
    report = {"created_utc": created.isoformat(), "settings": settings, "steps": rows, "dtypes": dtype_rows,
              "cycle": cycle, "cycle_error": cycle_error, "checks": checks, "load_average": os.getloadavg()}
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    sys.exit(1 if failed or cycle_error or (cycle and cycle["run_status"] != "succeeded") else 0)


if __name__ == "__main__":
    main()
