"""Learning benchmark: simulated users with one hidden preference teach the running product, round after round.

Everything goes through the real product, as people and operators use it:
* setup: --users keys made with ``flywheel keys create`` (each simulated user has its own key and seed);
* round 0 measures the model as it is; each later round then
  1. chat: the users ask --votes train prompts (bench/prompts.py; a fresh deterministic draw per round) through
     ``POST /v1/chat/completions`` on model ``flywheel`` (sampled, --temperature), --concurrency at a time;
  2. feedback: each user reacts (bench/users.py): a thumb on every answer, and an edit of a disapproved answer at
     --edit-rate, through ``PUT /api/messages/{id}/feedback``;
  3. train: ``flywheel train --now --wait --json`` (the worker trains, its gate decides, rollout may canary);
  4. roll out: a candidate or canary that passed the gate is promoted with ``POST /api/adapters/{v}/promote``
     (the operator's shortcut; the canary's live test needs more votes than a round has);
* after every round, held-out approval: greedy answers (temperature 0) from ``flywheel`` to held-out prompts no
  user asks, judged by the same hidden preference, with a Wilson 95% interval, mean words and the neutral
  no-collapse checks (on topic, not empty, not looping, finished; on topic as the gate reads it, by keywords or by
  the base model's likelihood, worker/checks.py);
* the run's reward model (worker/reward.py, the gate's judge) scores those held-out answers, compared with the
  hidden preference (AUC): does the judge agree with the users?

Each (preference, edit rate) pair runs on a service of its own: the bench starts ``flywheel up --no-ui`` on a
fresh database (``flywheel_loop_bench`` on --database-url's server) and data folder, with only the bench starting
runs (FLYWHEEL_TRAIN_MIN_NEW above a round's votes). With --url it drives an already running service instead (one
pair; give --admin-key and run it with that service's FLYWHEEL_* environment).

Targets (issue #8), checked per pair and printed as PASS/FAIL: with edits, held-out approval +40 points after one
round; thumbs only, +20 within two rounds; no neutral check falls more than 10 points below round 0; each round
from trigger to promoted adapter under 10 minutes. Prints a table per pair, writes JSON to
bench/results/loop-<UTC timestamp>.json and, when matplotlib is installed (``pip install -e '.[bench]'``), a PNG
of approval per round for each pair beside it. Exits 1 if a request or a run failed.

Run: ``python bench/loop.py --preference concise steps --edit-rate 0.3 0 --rounds 2`` (PostgreSQL and Redis
running, the default model fetched).
"""

import argparse
import asyncio
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
import typing
from datetime import UTC, datetime
from pathlib import Path

import httpx
from loop_report import plot, table, targets  # bench/loop_report.py, bench/prompts.py, ...: siblings
from prompts import load_prompts
from prompts import split as split_prompts
from serve import format_table
from swap import Replica, fresh_database
from users import PREFERENCES, SimulatedUser, make_user, neutral_checks, unit_draw, words

from service.feedback.stats import wilson_interval
from service.settings import Settings
from worker.checks import with_relevance
from worker.train import Algorithm

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ADMIN_KEY = "fw-loop-bench-admin"
ENV: dict[str, str] = dict(os.environ)  # what ``flywheel`` commands run with: the service's environment


def flywheel(*args: str) -> str:
    """Run a ``flywheel`` command with the service's environment; its stdout, or RuntimeError with its stderr."""
    proc = subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        raise RuntimeError(f"flywheel {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return proc.stdout


class Api:
    """The few HTTP calls a simulated user and an operator make."""

    def __init__(self, base_url: str, admin_key: str):
        self.http = httpx.AsyncClient(base_url=base_url, timeout=600)
        self.admin_key = admin_key

    def _auth(self, key: str | None) -> dict:
        return {"Authorization": f"Bearer {key or self.admin_key}"}

    async def chat(self, key: str, prompt: str, temperature: float, max_tokens: int, seed: int | None) -> dict:
        body = {"model": "flywheel", "messages": [{"role": "user", "content": prompt}], "temperature": temperature,
                "max_tokens": max_tokens, **({"seed": seed} if seed is not None and temperature > 0 else {})}
        response = await self.http.post("/v1/chat/completions", json=body, headers=self._auth(key))
        response.raise_for_status()
        reply = response.json()
        choice = reply["choices"][0]
        return {"answer": choice["message"]["content"] or "", "finished": choice["finish_reason"] == "stop",
                "message_id": reply["flywheel"]["message_id"], "adapter": reply["flywheel"]["adapter_version"]}

    async def feedback(self, key: str, message_id: str, body: dict) -> None:
        response = await self.http.put(f"/api/messages/{message_id}/feedback", json=body, headers=self._auth(key))
        response.raise_for_status()

    async def get(self, path: str) -> dict:
        response = await self.http.get(path, headers=self._auth(None))
        response.raise_for_status()
        return response.json()

    async def check_idle(self) -> None:
        """A round must own the loop: no run in flight (it would train on half a round), no canary splitting users."""
        busy = [r["id"] for r in (await self.get("/api/runs"))["data"] if r["status"] in ("queued", "running")]
        canary = (await self.get("/ready"))["serving"]["canary"]
        if busy or canary is not None:
            raise RuntimeError(f"the service is busy (runs in flight: {busy}, canary: {canary}); let them end or "
                               "reject the canary first")

    async def wait_serving(self, version: int, timeout_s: float = 120) -> None:
        """Until this process serves ``version`` as production (registry events reach it within seconds)."""
        deadline = time.monotonic() + timeout_s
        while (await self.get("/ready"))["serving"]["production"] != version:
            if time.monotonic() > deadline:
                raise RuntimeError(f"v{version} was promoted but is not served after {timeout_s:.0f} s")
            await asyncio.sleep(1)

    async def promote(self, version: int) -> None:
        response = await self.http.post(f"/api/adapters/{version}/promote", headers=self._auth(None),
                                        json={"reason": "bench/loop.py: passed the gate"})
        response.raise_for_status()


def round_prompts(prompts: list[str], round_no: int, count: int, seed: int) -> list[str]:
    """A deterministic draw of ``count`` train prompts for one round (with repeats once every prompt was drawn)."""
    order = sorted(prompts, key=lambda p: unit_draw(seed, round_no, p))
    return [order[i % len(order)] for i in range(count)]


async def gather_limited(concurrency: int, jobs):
    gate = asyncio.Semaphore(concurrency)

    async def run(job):
        async with gate:
            return await job

    return await asyncio.gather(*(run(j) for j in jobs))


async def users_chat_and_vote(api: Api, users: list[tuple[SimulatedUser, str]], prompts: list[str],
                              args: argparse.Namespace, round_no: int) -> dict:
    """Each prompt asked by user i % len(users), who then votes (and maybe edits) through the feedback API."""
    async def one(i: int, prompt: str) -> dict:
        user, key = users[i % len(users)]
        reply = await api.chat(key, prompt, args.temperature, args.max_tokens, seed=args.seed * 1000 + round_no + i)
        reaction = user.react(prompt, reply["answer"])
        for body in reaction.feedback():
            await api.feedback(key, reply["message_id"], body)
        return {"approved": reaction.approved, "edited": reaction.edit is not None}

    done = await gather_limited(args.concurrency, [one(i, p) for i, p in enumerate(prompts)])
    return {"votes": len(done), "approved": sum(d["approved"] for d in done), "edits": sum(d["edited"] for d in done)}


async def measure(api: Api, judge: SimulatedUser, heldout: list[str], args: argparse.Namespace) -> dict:
    """Held-out approval of what ``flywheel`` now answers greedily, judged by the hidden preference."""
    replies = await gather_limited(args.concurrency, [api.chat(api.admin_key, p, 0.0, args.max_tokens, None)
                                                      for p in heldout])
    approved = sum(judge.approves(p, r["answer"]) for p, r in zip(heldout, replies, strict=True))
    rules = [neutral_checks(p, r["answer"], r["finished"]) for p, r in zip(heldout, replies, strict=True)]
    model, tokenizer = base_model(args.base_model)
    checks = await asyncio.to_thread(with_relevance, model, tokenizer, heldout, [r["answer"] for r in replies], rules)
    low, high = wilson_interval(approved, len(heldout)) or (None, None)
    return {"approval": approved / len(heldout), "approval_low": low, "approval_high": high,
            "mean_words": sum(len(words(r["answer"])) for r in replies) / len(replies),
            "neutral": {name: sum(c[name] for c in checks) / len(checks) for name in checks[0]},
            "on_topic_by_keywords": sum(c["on_topic"] for c in rules) / len(rules),
            "adapters_seen": sorted({str(r["adapter"]) for r in replies}),
            "answers": [{"prompt": p, "answer": r["answer"], "finished": r["finished"],
                         "approved": judge.approves(p, r["answer"])} for p, r in zip(heldout, replies, strict=True)]}


@functools.cache
def base_model(path: str):
    """The base model, loaded once: the neutral checks' relevance rule (worker/checks.py) reads answers with it."""
    from service.engine.weights import load_pretrained

    model, tokenizer = load_pretrained(path)
    return model.eval(), tokenizer


def judge_agreement(answers: list[dict]) -> dict:
    """Does the run's reward model (the gate's judge) agree with the hidden preference? AUC of its scores of the
    held-out answers just measured, approved against disapproved; {} before any reward model was trained."""
    from service.settings import Settings
    from worker.reward import RewardModel

    settings = Settings.from_env(ENV)
    judge = RewardModel.latest(settings.data_dir / "reward", settings.base_model)
    if judge is None:
        return {}
    scores = judge.score([[{"role": "user", "content": a["prompt"]}] for a in answers], [a["answer"] for a in answers])
    good = [s for s, a in zip(scores, answers, strict=True) if a["approved"]]
    bad = [s for s, a in zip(scores, answers, strict=True) if not a["approved"]]
    auc = sum((g > b) + 0.5 * (g == b) for g in good for b in bad) / (len(good) * len(bad)) if good and bad else None
    return {"reward_version": judge.version, "reward_heldout_accuracy": judge.heldout_accuracy,
            "reward_vs_user_auc": auc}


async def train_and_roll_out(api: Api, args: argparse.Namespace) -> dict:
    """``flywheel train --now --wait``; then promote the run's adapter if it passed the gate."""
    command = ["train", "--now", "--wait", "--json"] + (["--algorithm", args.algorithm] if args.algorithm else []) \
        + (["--max-steps", str(args.max_steps)] if args.max_steps else [])
    started = time.perf_counter()
    try:
        run = json.loads(await asyncio.to_thread(flywheel, *command))
    except RuntimeError as error:
        return {"error": str(error), "train_s": time.perf_counter() - started}
    metrics = run.get("metrics") or {}
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    version = metrics.get("adapter_version")
    # its status now, not at registration: the rollout may have made it a canary already
    adapter = await api.get(f"/api/adapters/{version}") if version else None
    out = {"run": run["id"], "train_s": time.perf_counter() - started, "adapter": version,
           "stages": "+".join(s.get("algorithm", "?") for s in metrics.get("stages") or []),
           "verdict": adapter["status"] if adapter else metrics.get("note", "no adapter"),
           "gate": {k: metrics.get(k) for k in ("candidate_accuracy", "production_accuracy", "candidate_only_right",
                                                "production_only_right", "kl_from_base", "changed_share",
                                                "judge_win_rate", "judge_margin", "neutral_candidate",
                                                "neutral_production", "gate_reasons", "reward_model", "best_of_k",
                                                "train_seconds", "gate_seconds")}}
    if adapter and adapter["status"] in ("candidate", "canary") and not args.no_promote:
        await api.promote(version)
        await api.wait_serving(version)
        out["verdict"] += " -> production"
    out["trigger_to_serving_s"] = time.perf_counter() - started
    return out


async def bench(args: argparse.Namespace, preference: str, edit_rate: float) -> dict:
    config = json.loads(flywheel("config", "--json"))
    min_new = int(config.get("FLYWHEEL_TRAIN_MIN_NEW", "32"))
    if min_new <= args.votes * 2:
        raise SystemExit(f"FLYWHEEL_TRAIN_MIN_NEW={min_new}: the worker would start runs mid-round; run the service "
                         f"and this bench with FLYWHEEL_TRAIN_MIN_NEW above {args.votes * 2}")
    api = Api(args.url, args.admin_key)
    await api.check_idle()
    parts = split_prompts(load_prompts())
    train, heldout = [p.text for p in parts["train"]], [p.text for p in parts["heldout"]][: args.heldout]
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    keys = [flywheel("keys", "create", "--role", "user", "--name", f"bench-loop-{stamp}-{i}").strip().splitlines()[-1]
            for i in range(args.users)]
    users = [(make_user(preference, edit_rate, seed=args.seed + i), key) for i, key in enumerate(keys)]
    judge = make_user(preference, 0.0, seed=args.seed)
    rounds = [{"round": 0, **await measure(api, judge, heldout, args)}]
    print(f"round 0: approval {rounds[0]['approval']:.0%}", file=sys.stderr)
    for round_no in range(1, args.rounds + 1):
        votes = await users_chat_and_vote(api, users, round_prompts(train, round_no, args.votes, args.seed), args,
                                          round_no)
        trained = await train_and_roll_out(api, args)
        rounds.append({"round": round_no, **votes, **trained, **await measure(api, judge, heldout, args)})
        rounds[-1].update(await asyncio.to_thread(judge_agreement, rounds[-1]["answers"]))
        print(f"round {round_no}: approval {rounds[-1]['approval']:.0%}, "
              f"{trained.get('verdict') or trained.get('error')}", file=sys.stderr)
    await api.http.aclose()
    return {"preference": preference, "edit_rate": edit_rate, "users": args.users, "votes": args.votes,
            "heldout_prompts": len(heldout), "max_tokens": args.max_tokens, "temperature": args.temperature,
            "rounds": rounds, "finished_at": datetime.now(UTC).isoformat()}


async def own_service(args: argparse.Namespace, log: Path) -> Replica:
    """``flywheel up --no-ui`` on a fresh database and data folder, with only this bench starting runs."""
    database_url = await fresh_database(args.database_url, "flywheel_loop_bench")
    data_dir = RESULTS_DIR / "loop-data"
    shutil.rmtree(data_dir, ignore_errors=True)  # adapters of the database just dropped
    ENV.clear()
    ENV.update({k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")})
    ENV.update(FLYWHEEL_DATABASE_URL=database_url, FLYWHEEL_REDIS_URL=args.redis_url, FLYWHEEL_ADMIN_KEY=ADMIN_KEY,
               FLYWHEEL_RATE_LIMIT_PER_MIN="0", FLYWHEEL_TRAIN_MIN_NEW=str(args.votes * 4 + 1),
               FLYWHEEL_DATA_DIR=str(data_dir), FLYWHEEL_TRAIN_POLL_S="2",
               FLYWHEEL_AUTO_ROLLOUT="false")
    service = Replica(ENV, log, command=("up", "--no-ui", "--embedded", "never"))
    async with httpx.AsyncClient(timeout=10) as http:
        await service.wait_ready(http, timeout=300)
    return service


async def run_all(args: argparse.Namespace) -> list[dict]:
    results = []
    for preference, edit_rate in itertools.product(args.preference, args.edit_rate):
        service = None
        if not args.url:
            service = await own_service(args, RESULTS_DIR / f"loop-{preference}-{edit_rate:g}.log")
        url, key = (args.url, args.admin_key) if args.url else (service.url, ADMIN_KEY)
        try:
            started = time.perf_counter()
            result = await bench(argparse.Namespace(**{**vars(args), "url": url, "admin_key": key}), preference,
                                 edit_rate)
            result["seconds"] = time.perf_counter() - started
        finally:
            if service:
                service.stop()
        print(f"\n{preference}, edit rate {edit_rate:g}")
        print(table(result))
        print(format_table(["check", "value", "target", "result"], targets(result)))
        results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="drive this running service instead of starting one per pair")
    parser.add_argument("--admin-key", help="with --url: an operator or admin key")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a database on the PostgreSQL server for the bench's own services")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--preference", nargs="+", choices=sorted(PREFERENCES), default=["concise"])
    parser.add_argument("--edit-rate", nargs="+", type=float, default=[0.3],
                        help="share of disapproved answers edited; 0 = thumbs only")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--users", type=int, default=8, help="simulated users, each with its own key (>= 5: the "
                                                               "per-owner cap)")
    parser.add_argument("--votes", type=int, default=64, help="answers rated per round")
    parser.add_argument("--heldout", type=int, default=48, help="held-out prompts measured (at most all of them)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.9, help="sampling of the answers users rate")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--algorithm", choices=typing.get_args(Algorithm), help="default: the service's setting")
    parser.add_argument("--max-steps", type=int, help="steps per training stage (default: the worker's epochs)")
    parser.add_argument("--no-promote", action="store_true", help="leave a passing adapter to the rollout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-model", default=Settings.from_env({}).base_model,
                        help="the served base model's folder (default: the default model)")
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/loop-<UTC timestamp>.json)")
    args = parser.parse_args()
    if args.url and (not args.admin_key or len(args.preference) * len(args.edit_rate) > 1):
        parser.error("--url drives one running service: give --admin-key and one preference and edit rate")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    try:
        results = asyncio.run(run_all(args))
    except (httpx.HTTPError, RuntimeError) as error:
        print(f"bench/loop.py failed: {error}", file=sys.stderr)
        return 1
    out = args.out or RESULTS_DIR / f"loop-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"results": results, "targets": [targets(r) for r in results]}, indent=2,
                              default=str))
    print(f"wrote {out}")
    png = out.with_suffix(".png")
    print(f"wrote {png}" if plot(results, png) else "no PNG: pip install -e '.[bench]' for matplotlib")
    return 1 if any("error" in r for res in results for r in res["rounds"]) else 0


if __name__ == "__main__":
    sys.exit(main())
