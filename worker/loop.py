"""The worker's loop: decide when to train, train one run at a time, register what it produced.

Every FLYWHEEL_TRAIN_POLL_S the worker takes the trainer lock in Redis (a TTL it keeps extending while it works),
then runs the oldest queued run (`flywheel train --now`, POST /api/runs) or, when enough usable feedback is new
(or the interval passed with any), a triggered one. The `training_runs` row is the durable record; its partial
unique index allows one running run whatever Redis says. A run whose worker died is marked failed when the lock
shows nobody holds it, and its adapter too, so nothing half-trained is ever served. SIGTERM cancels cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from service.adapters import registry
from service.adapters.events import publish as publish_adapters
from service.adapters.files import adapter_digest
from service.app import open_database
from service.errors import Conflict
from service.runs import store as runs
from service.settings import Settings
from worker import rollout
from worker.data import build_training_data, count_new_feedback
from worker.evaluate import GATE_PROMPTS, GateConfig, evaluate
from worker.reward import RewardModel, RewardTrainConfig, preference_rows, train_reward_model
from worker.train import Cancelled, NoUsableData, TrainConfig, plan_stages, train_adapter

log = logging.getLogger(__name__)
LOCK_KEY = "flywheel:trainer-lock"
RUNS_CHANNEL = "flywheel:runs"
LOCK_TTL_S = 60


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def train_config(settings: Settings, params: dict | None = None) -> TrainConfig:
    """The settings' defaults, overridden by what a manual run asked for."""
    t = settings.training
    defaults = {"algorithm": t.train_algorithm, "start_from": t.train_start_from, "max_steps": t.train_max_steps}
    return TrainConfig(**{**defaults, **(params or {})})


class Worker:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, redis: aioredis.Redis):
        self.settings, self.pool, self.redis = settings, pool, redis
        self.id = worker_id()
        self.stop_training = threading.Event()

    # --- locking and recovery ---------------------------------------------------------------------------------
    async def acquire_lock(self) -> bool:
        return bool(await self.redis.set(LOCK_KEY, self.id, nx=True, ex=LOCK_TTL_S))

    async def release_lock(self) -> None:
        with contextlib.suppress(OSError, aioredis.RedisError):
            if (await self.redis.get(LOCK_KEY) or b"").decode() == self.id:
                await self.redis.delete(LOCK_KEY)

    async def keep_lock(self) -> None:
        """Extend the lock while a run works; losing it (Redis flushed, another worker took it) stops the run."""
        while True:
            await asyncio.sleep(LOCK_TTL_S / 3)
            try:
                holder = (await self.redis.get(LOCK_KEY) or b"").decode()
                if holder == self.id:
                    await self.redis.expire(LOCK_KEY, LOCK_TTL_S)
                elif holder == "":
                    await self.redis.set(LOCK_KEY, self.id, nx=True, ex=LOCK_TTL_S)  # Redis restarted: re-take
                else:
                    log.error("trainer lock taken by %s; stopping this run", holder)
                    self.stop_training.set()
                    return
            except (OSError, aioredis.RedisError) as exc:
                log.warning("cannot extend the trainer lock: %s", exc)

    async def recover(self, holding_lock: bool) -> None:
        """Fail runs whose worker is gone, with their adapters.

        Holding the lock proves no other worker is training, so every running run is orphaned. Without it (at
        start), a run whose worker was a process of this host that no longer exists is orphaned too, and the lock
        it left behind is released instead of waiting for its TTL.
        """
        holder = (await self.redis.get(LOCK_KEY) or b"").decode()
        for run in await runs.running(self.pool):
            owner = run["worker"] or ""
            if not (holding_lock and owner != self.id) and not _dead_here(owner):
                continue
            await self._fail(run["id"], f"worker {owner} stopped without finishing the run", status="failed")
            if holder == owner:
                await self.redis.delete(LOCK_KEY)
            log.warning("run %s failed: worker %s is gone", run["id"], owner)

    # --- one cycle ----------------------------------------------------------------------------------------------
    async def cycle(self) -> int | None:
        """Run whatever is due; the id of the run executed, if any."""
        if not await self.acquire_lock():
            return None
        try:
            await self.recover(holding_lock=True)
            await self.roll_out()
            run = await self._claim_queued() or await self._triggered()
            if run is None:
                return None
            await self.execute(run)
            return run["id"]
        finally:
            await self.release_lock()

    async def roll_out(self) -> None:
        """Decide the running canary from its live votes (FLYWHEEL_AUTO_ROLLOUT)."""
        r = self.settings.rollout
        if not r.auto_rollout:
            return
        decision = await rollout.step(self.pool, min_votes=r.rollout_min_votes, max_drop=r.rollout_max_drop,
                                      alpha=r.rollout_alpha, max_hours=r.rollout_max_canary_hours, actor=self.id)
        if decision and decision.action != "wait":
            log.info("canary %s: %s", decision.action, decision.numbers)
            await publish_adapters(self.redis, {"operation": decision.action, "by": "rollout"})

    async def _claim_queued(self):
        queued = await runs.oldest_queued(self.pool)
        return await runs.start(self.pool, queued["id"], self.id) if queued else None

    async def _triggered(self):
        t = self.settings.training
        since = await runs.last_data_until(self.pool)
        new = await count_new_feedback(self.pool, since)
        # The interval counts from the last run, or before any run from the oldest feedback: a first vote alone
        # must not start a run at once.
        last = await runs.last_finished_at(self.pool) or await self.pool.fetchval("SELECT min(created_at) FROM "
                                                                                  "feedback")
        interval_due = new > 0 and datetime.now(UTC) - last > timedelta(seconds=t.train_interval_s)
        if new < t.train_min_new and not interval_due:
            return None
        trigger = "threshold" if new >= t.train_min_new else "interval"
        queued = await runs.queue(self.pool, algorithm=t.train_algorithm, params={}, requested_by=self.id,
                                  trigger=trigger)
        log.info("%d new feedback items: starting run %s (%s)", new, queued["id"], trigger)
        return await runs.start(self.pool, queued["id"], self.id)

    # --- a run ----------------------------------------------------------------------------------------------------
    async def execute(self, run) -> None:
        self.stop_training.clear()
        keeper = asyncio.create_task(self.keep_lock())
        version = None
        try:
            config = train_config(self.settings, run["params"])
            t = self.settings.training
            data = await build_training_data(self.pool, t.heldout_fraction, t.max_owner_share)
            await runs.record_data(self.pool, run["id"], data.counts(), data.data_until, config.as_dict())
            plan_stages(config, data)  # NoUsableData before anything is created
            production = await self.pool.fetchrow("SELECT version, path FROM adapters WHERE status = 'production'")
            parent = production if production and config.start_from == "production" else None
            async with self.pool.acquire() as conn, conn.transaction():
                row = await registry.create_training(conn, base_model=self.settings.base_model,
                                                     algorithm=config.algorithm, run_id=run["id"],
                                                     parent_version=parent["version"] if parent else None,
                                                     actor=self.id)
            version = row["version"]
            out_dir = self.settings.adapter_dir / str(version)
            loop = asyncio.get_running_loop()
            report = _Reporter(self, run["id"], loop)
            gate = GateConfig(gate_prompts=Path(t.gate_prompts).expanduser() if t.gate_prompts else GATE_PROMPTS,
                              answer_cache=self.settings.data_dir / "gate-answers")
            judge, judged = await asyncio.to_thread(self._train_judge, config, data, report)
            if config.algorithm == "rl" and not gate.trusts(judge):
                raise NoUsableData(f"rl optimises the run's reward model, which must be trusted (held-out accuracy "
                                   f"above {gate.min_judge_accuracy} with 95% confidence): "
                                   f"{_json(judged['reward_model'])}")
            optimisable = judge if gate.trusts(judge) else None
            if optimisable and t.best_of_k > 1 and config.algorithm in ("auto", "sft"):
                judged["best_of_k"] = await asyncio.to_thread(  # SFT rows: what the judge picks of k samples
                    self._best_of_k, judge, data, production["path"] if production else None, config)
            result = await asyncio.to_thread(train_adapter, config, data, self.settings.base_model, out_dir,
                                             report, self.stop_training, parent["path"] if parent else None,
                                             optimisable, time.monotonic() + t.train_seconds)
            _write_lineage(out_dir, version=version, parent_version=row["parent_version"], run_id=run["id"],
                           data_until=data.data_until, config=config.as_dict(), counts=data.counts())
            # The bar to clear is what serves now: production, or the base when there is none.
            verdict = await asyncio.to_thread(evaluate, self.settings.base_model, str(out_dir),
                                              production["path"] if production else None, data, gate, judge,
                                              self.stop_training)
            sha256, size = adapter_digest(out_dir)
            metrics = {**verdict.metrics, "gate_reasons": verdict.reasons, "stages": result.stages,
                       "train_seconds": result.seconds, **judged}
            status = "candidate" if verdict.passed else "rejected"
            async with self.pool.acquire() as conn, conn.transaction():
                await registry.transition(conn, version, status, actor=self.id, reason="; ".join(verdict.reasons)
                                          or "passed the gate", path=str(out_dir), sha256=sha256, size_bytes=size,
                                          metrics=metrics)
                await runs.finish(conn, run["id"], "succeeded", metrics={"adapter_version": version,
                                                                          "verdict": status, **metrics})
            await self._publish(run["id"], {"status": "succeeded", "adapter_version": version, "verdict": status})
            if verdict.passed and self.settings.rollout.auto_rollout:
                await self._start_canary(version)
            log.info("run %s: adapter v%s is %s", run["id"], version, status)
        except NoUsableData as exc:
            await self._fail(run["id"], None, status="succeeded", version=version, note=str(exc))
            log.info("run %s had nothing to train: %s", run["id"], exc)
        except Cancelled:
            await self._fail(run["id"], "stopped before it finished", status="cancelled", version=version)
        except Exception as exc:  # noqa: BLE001 - a failed run must never take the worker down
            log.exception("run %s failed", run["id"])
            await self._fail(run["id"], f"{type(exc).__name__}: {exc}", status="failed", version=version)
        finally:
            keeper.cancel()

    def _train_judge(self, config: TrainConfig, data, report) -> tuple[RewardModel | None, dict]:
        """The run's reward model from the same feedback, when there is enough of it; (judge, metrics to record).

        A new version every run: the votes grow, and the judge must know what users want now.
        """
        t = self.settings.training
        pairs = len(preference_rows(data, "train", RewardTrainConfig.thumb_pairs))
        if not t.reward_min_pairs or pairs < t.reward_min_pairs:
            return None, {"reward_model": f"not trained: {pairs} preference pairs, {t.reward_min_pairs} needed"}
        reward_config = RewardTrainConfig(max_steps=min(config.max_steps or t.reward_max_steps, t.reward_max_steps),
                                          validation_share=t.reward_validation_share, seed=config.seed)
        result = train_reward_model(reward_config, data, self.settings.base_model, self.settings.data_dir / "reward",
                                    report, self.stop_training)
        m = result.metrics
        return RewardModel(result.path, self.settings.base_model), {"reward_model": {
            "version": result.version, "heldout_accuracy": m["heldout_accuracy"], "counts": m["counts"],
            "steps": m["steps"], "seconds": m["seconds"]}}

    def _best_of_k(self, judge: RewardModel, data, production_path: str | None, config: TrainConfig) -> dict:
        """Sample from what serves now, keep the judge's favourites as SFT rows (into ``data``).

        Only prompts users left without a target (an edit or an approved answer says what they want better than the
        judge's guess), none once their targets are enough, and only picks the judge scores as users would approve
        them (worker/sampling.py)."""
        from worker.sampling import best_of_k, load_sampler, prompts_to_sample
        from worker.train import user_targets

        t = self.settings.training
        started = time.monotonic()
        targets = user_targets(config, data)
        prompts = prompts_to_sample(data, t.best_of_prompts, targets)
        if not prompts:
            return {"prompts": 0, "rows": 0, "seconds": 0.0, "user_targets": len(targets)}
        model, tokenizer = load_sampler(self.settings.base_model, production_path)
        data.best_of_k, counts = best_of_k(model, tokenizer, judge, prompts, k=t.best_of_k, targets=targets,
                                           thumbs=data.kto.train, max_new_tokens=GateConfig.max_new_tokens,
                                           seed=config.seed, deadline=started + t.best_of_seconds,
                                           stop=self.stop_training)
        return {**counts, "seconds": round(time.monotonic() - started, 1)}

    async def _start_canary(self, version: int) -> None:
        """A candidate that passed the gate meets real users: a canary at FLYWHEEL_CANARY_PERCENT."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await registry.start_canary(conn, version, self.settings.rollout.canary_percent, actor=self.id,
                                            reason="passed the gate")
        except Conflict as exc:  # another canary is still being decided: this one waits as a candidate
            log.info("v%s stays a candidate: %s", version, exc)
            return
        await publish_adapters(self.redis, {"operation": "canary", "version": version, "by": "rollout"})

    async def _fail(self, run_id: int, error: str | None, *, status: str, version: int | None = None,
                    note: str | None = None) -> None:
        """End a run without a usable adapter: mark both, remove any partial files."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch("SELECT version FROM adapters WHERE run_id = $1 AND status = 'training'", run_id)
            for row in rows:
                await registry.transition(conn, row["version"], "failed", actor=self.id,
                                          reason=error or note or status)
                shutil.rmtree(self.settings.adapter_dir / str(row["version"]), ignore_errors=True)
            await runs.finish(conn, run_id, status, error=error, metrics={"note": note} if note else None)
        await self._publish(run_id, {"status": status, "error": error, "note": note})

    async def _publish(self, run_id: int, event: dict) -> None:
        with contextlib.suppress(OSError, aioredis.RedisError):
            await self.redis.publish(RUNS_CHANNEL, _json({"run_id": run_id, **event}))


class _Reporter:
    """Called from the training thread; writes progress to the run row and Redis from the event loop."""

    def __init__(self, worker: Worker, run_id: int, loop: asyncio.AbstractEventLoop):
        self.worker, self.run_id, self.loop = worker, run_id, loop

    def __call__(self, progress: dict) -> None:
        asyncio.run_coroutine_threadsafe(self._write(progress), self.loop)

    async def _write(self, progress: dict) -> None:
        try:
            await runs.progress(self.worker.pool, self.run_id, progress)
            await self.worker._publish(self.run_id, {"status": "running", "progress": progress})
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("progress of run %s not recorded: %s", self.run_id, exc)


def _write_lineage(out_dir, **lineage) -> None:
    """Where the adapter came from, beside its files (the checksum covers only config and weights)."""
    (out_dir / "flywheel-lineage.json").write_text(_json(lineage))


def _dead_here(worker: str) -> bool:
    """True if ``worker`` (host:pid) names a process of this host that no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _json(value: dict) -> str:
    import json

    return json.dumps(value, default=str)


async def run_worker(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set or the process gets SIGTERM/SIGINT (a run in progress is cancelled cleanly)."""
    stop = stop or asyncio.Event()
    pool = await open_database(settings)
    redis = aioredis.from_url(settings.redis_url)
    worker = Worker(settings, pool, redis)

    def shutdown() -> None:
        stop.set()
        worker.stop_training.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown)
    log.info("worker %s started", worker.id)
    try:
        with contextlib.suppress(OSError, aioredis.RedisError):
            await worker.recover(holding_lock=False)
        while not stop.is_set():
            try:
                await worker.cycle()
            except (OSError, asyncpg.PostgresError, aioredis.RedisError) as exc:
                log.warning("worker cycle skipped, a backend is unavailable: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=settings.training.train_poll_s)
    finally:
        await redis.aclose()
        await pool.close()
        log.info("worker %s stopped", worker.id)
