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
  thumbed down (edited instead on every fourth): 64 feedback items. One ``Worker.cycle()`` (FLYWHEEL_TRAIN_MIN_NEW
  =32, algorithm auto) is timed from the trigger check to the registered adapter. Target: under 600 s.

Writes JSON to bench/results/train-<UTC timestamp>.json (or --out). Exits 1 if a measurement failed.
Run: ``python bench/train.py`` (several minutes on 2 cores; never touches the network).
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
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/flywheel_benchtrain"
TARGET_S = 600.0
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
    moved = None if key not in first or key not in last else \
        (first[key] - last[key] if algorithm == "sft" else last[key] - first[key])
    return {"algorithm": algorithm, "dtype": dtype, "steps": len(reports),
            "s_per_step": sum(gaps) / len(gaps) if gaps else None, "train_s": result.seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss_first": first.get("loss"), "loss_last": last.get("loss"),
            "margin_first": first.get("rewards/margins"), "margin_last": last.get("rewards/margins"), "moved": moved}


def run_one(args: argparse.Namespace, algorithm: str, dtype: str) -> dict:
    """measure_one in a fresh subprocess; its JSON is the last line of its stdout."""
    print(f"training {algorithm} {dtype} ...", file=sys.stderr)
    cmd = [sys.executable, __file__, "--one", algorithm, dtype, "--json", "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--base-model",
           str(args.base_model)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0 and proc.stdout.strip():
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return {"algorithm": algorithm, "dtype": dtype, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}


def compare_dtypes(rows: list[dict]) -> list[dict]:
    """Per algorithm with both dtypes measured: bf16 speed-up over fp32 and what each moved."""
    by = {(r["algorithm"], r["dtype"]): r for r in rows if "error" not in r}
    out = []
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        fp, bf = by.get((algorithm, "float32")), by.get((algorithm, "bfloat16"))
        if not (fp and bf):
            continue
        speedup = fp["s_per_step"] / bf["s_per_step"] if fp["s_per_step"] and bf["s_per_step"] else None
        ok = fp["moved"] is not None and bf["moved"] is not None
        out.append({"algorithm": algorithm, "fp32_s_per_step": fp["s_per_step"], "bf16_s_per_step": bf["s_per_step"],
                    "bf16_speedup": speedup, "fp32_moved": fp["moved"], "bf16_moved": bf["moved"],
                    "bf16_learned_less": None if not ok else "yes" if bf["moved"] < fp["moved"] else "no"})
    return out


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
        feedback.append((ramble, owner, "edit", None, a) if i % 4 == 3 else (ramble, owner, "thumb", -1, None))
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
        sys.exit(f"{args.database_url} already holds feedback: drop it or pass another --database-url")
    data_dir, redis = SCRATCH / "data", aioredis.from_url(args.redis_url)
    pool = None
    try:
        if await redis.exists(LOCK_KEY):
            sys.exit(f"{LOCK_KEY} is held in {args.redis_url}: is a worker using it? pass another --redis-url")
        items = await seed(conn)
        settings = Settings.from_env({
            "FLYWHEEL_DATABASE_URL": args.database_url, "FLYWHEEL_REDIS_URL": args.redis_url,
            "FLYWHEEL_DATA_DIR": str(data_dir), "FLYWHEEL_BASE_MODEL": str(args.base_model),
            "FLYWHEEL_TRAIN_MIN_NEW": "32", "FLYWHEEL_TRAIN_ALGORITHM": "auto"})
        pool = await db.create_pool(args.database_url, 4)
        print(f"running Worker.cycle() on {items} feedback items ...", file=sys.stderr)
        start = time.perf_counter()
        run_id = await Worker(settings, pool, redis).cycle()
        seconds = time.perf_counter() - start
        run = await pool.fetchrow("SELECT status, error, counts, metrics FROM training_runs WHERE id = $1", run_id)
        adapter = await pool.fetchrow("SELECT version, status, metrics FROM adapters WHERE run_id = $1 "
                                      "ORDER BY version DESC LIMIT 1", run_id)
    finally:
        await conn.close()
        await redis.aclose()
        if pool is not None:
            await pool.close()
        if not args.keep:
            await drop_database(args.database_url)
            shutil.rmtree(data_dir, ignore_errors=True)
    metrics = (adapter or {}).get("metrics") or {}
    return {"items": items, "run_id": run_id, "seconds": seconds, "run_status": run and run["status"],
            "run_error": run and run["error"], "counts": run and run["counts"],
            "stages": [(s["algorithm"], s["steps"]) for s in metrics.get("stages", [])],
            "train_seconds": metrics.get("train_seconds"), "adapter_version": adapter and adapter["version"],
            "verdict": adapter and adapter["status"], "gate_reasons": metrics.get("gate_reasons"),
            "candidate_accuracy": metrics.get("candidate_accuracy"), "kl_from_base": metrics.get("kl_from_base")}


async def drop_database(url: str) -> None:
    parts = urlsplit(url)
    admin = await asyncpg.connect(urlunsplit(parts._replace(path="/postgres")))
    try:
        name = parts.path.lstrip("/").replace('"', '""')
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


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
    cycle = None if args.skip_cycle else asyncio.run(cycle_bench(args))

    if measured:
        print(format_table(["algorithm", "dtype", "steps", "s/step", "train s", "peak RSS MiB", "loss first",
                            "loss last", "margin first", "margin last", "moved"], [list(r.values()) for r in measured]))
        print("\nmoved: loss drop (sft) or rewards/margins gain (dpo, kto) from the first logged step to the last\n")
    if dtype_rows:
        print(format_table(["algorithm", "fp32 s/step", "bf16 s/step", "bf16 speed-up", "fp32 moved", "bf16 moved",
                            "bf16 learned less"], [list(r.values()) for r in dtype_rows]))
        print()
    checks = []
    if cycle:
        ok = cycle["run_status"] == "succeeded" and cycle["verdict"] in ("candidate", "rejected")
        checks.append({"check": f"trigger -> registered adapter, {cycle['items']} items (s)",
                       "value": cycle["seconds"], "target": f"< {TARGET_S:.0f}",
                       "result": "PASS" if ok and cycle["seconds"] < TARGET_S else "FAIL"})
        print(format_table(["run", "status", "stages (steps)", "train s", "adapter", "verdict", "accuracy", "KL"],
                           [[cycle["run_id"], cycle["run_status"], " ".join(f"{a}({n})" for a, n in cycle["stages"]),
                             cycle["train_seconds"], cycle["adapter_version"], cycle["verdict"],
                             cycle["candidate_accuracy"], cycle["kl_from_base"]]]))
        print(f"\ncounts: {cycle['counts']}\ngate: {cycle['gate_reasons'] or cycle['run_error']}\n")
        print(format_table(["check", "value", "target", "result"], [list(c.values()) for c in checks]))
    for r in failed:
        print(f"\n{r['algorithm']} {r['dtype']} failed: {r['error']}")

    out = args.out or RESULTS_DIR / f"train-{created:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    hidden = ("one", "json", "out", "database_url", "redis_url")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in hidden}
    report = {"created_utc": created.isoformat(), "settings": settings, "steps": rows, "dtypes": dtype_rows,
              "cycle": cycle, "checks": checks}
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    sys.exit(1 if failed or (cycle and cycle["run_status"] != "succeeded") else 0)


if __name__ == "__main__":
    main()
