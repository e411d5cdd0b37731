"""The worker loop on real Postgres, Redis and the default model: triggers, registration, locks, crashes, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis

from service import db
from service.adapters.files import adapter_digest
from service.runs import store as runs
from service.settings import Settings
from tests.conftest import checksummed_files
from worker.loop import LOCK_KEY, Worker

pytestmark = pytest.mark.slow
RAMBLE = "Well, that is a long story, and there are many sides to it that we should consider first. "


async def seed_feedback(pool, prompts: int, owners: int = 6, edits: bool = True) -> None:
    """Per prompt: a short answer thumbed up, a rambling one thumbed down (and edited to be short)."""
    keys = [await pool.fetchval("INSERT INTO api_keys (name, role, key_hash, key_prefix) VALUES ($1, 'user', $1, "
                                "'fw-') RETURNING id", f"user-{i}") for i in range(owners)]
    for i in range(prompts):
        owner = keys[i % owners]
        cid = await pool.fetchval("INSERT INTO conversations (owner) VALUES ($1) RETURNING id", owner)
        question = await pool.fetchval("INSERT INTO messages (conversation_id, role, content) VALUES ($1, 'user', "
                                       "$2) RETURNING id", cid, f"What is {i} plus {i}?")
        answers = []
        for text in (f"{2 * i}.", RAMBLE * 2):
            answers.append(await pool.fetchval(
                "INSERT INTO messages (conversation_id, parent_id, role, content, completion_tokens) "
                "VALUES ($1, $2, 'assistant', $3, 1) RETURNING id", cid, question, text))
        await pool.execute("INSERT INTO feedback (message_id, owner, kind, value) VALUES ($1, $2, 'thumb', 1), "
                           "($3, $2, 'thumb', -1)", answers[0], owner, answers[1])
        if edits:
            await pool.execute("INSERT INTO feedback (message_id, owner, kind, content) VALUES ($1, $2, 'edit', $3)",
                               answers[1], owner, f"It is {2 * i}.")


@pytest.fixture
def settings(database_url, redis_url, model_dir, shared_tmp, request) -> Settings:
    return Settings.from_env({
        "FLYWHEEL_DATABASE_URL": database_url, "FLYWHEEL_REDIS_URL": redis_url, "FLYWHEEL_MODEL_DIR": str(model_dir),
        "FLYWHEEL_DATA_DIR": str(shared_tmp / f"worker-{request.node.name[:40]}"), "FLYWHEEL_TRAIN_MIN_NEW": "10",
        "FLYWHEEL_TRAIN_MAX_STEPS": "2", "FLYWHEEL_TRAIN_POLL_S": "0.5",
    })


@pytest.fixture
async def backends(settings):
    pool = await db.create_pool(settings.database_url, 4)
    redis = aioredis.from_url(settings.redis_url)
    await redis.delete(LOCK_KEY)
    yield pool, redis
    await redis.delete(LOCK_KEY)
    await redis.aclose()
    await pool.close()


async def test_enough_new_feedback_triggers_a_run_that_registers_a_gated_adapter(settings, backends, default_model):
    pool, redis = backends
    worker = Worker(settings, pool, redis)
    assert await worker.cycle() is None  # no feedback: nothing is due
    await seed_feedback(pool, prompts=12)

    run_id = await worker.cycle()
    run = await runs.get(pool, run_id)
    assert run["status"] == "succeeded" and run["trigger"] == "threshold", run["error"]
    assert run["counts"]["sft_train"] + run["counts"]["sft_heldout"] == 12 and run["data_until"] is not None
    assert run["progress"]["step"] == 2 and run["params"]["max_steps"] == 2
    adapter = await pool.fetchrow("SELECT * FROM adapters WHERE run_id = $1", run_id)
    verdict = run["metrics"]["verdict"]
    assert verdict in ("candidate", "rejected")
    assert adapter["status"] == ("canary" if verdict == "candidate" else "rejected")  # a passing one meets users
    assert {"candidate_accuracy", "kl_from_base", "stages", "gate_reasons"} <= set(adapter["metrics"])
    judge = adapter["metrics"]["reward_model"]  # the run trained its judge on the same votes, capped at 2 steps
    pairs = judge["counts"]["train_pairs"], judge["counts"]["heldout_pairs"]
    assert judge["version"] == 1 and judge["steps"] == 2 and sum(pairs) == run["counts"]["dpo_train"] + \
        run["counts"]["dpo_heldout"]  # every pair on one side: the run's held-out ones and a few more set aside
    assert pairs[0] < run["counts"]["dpo_train"] and pairs[1] > run["counts"]["dpo_heldout"], (pairs, run["counts"])
    assert (Path(settings.data_dir) / "reward" / "1.json").is_file()
    assert adapter_digest(adapter["path"]) == (adapter["sha256"], adapter["size_bytes"])
    lineage = json.loads((Path(adapter["path"]) / "flywheel-lineage.json").read_text())
    assert lineage["run_id"] == run_id and lineage["parent_version"] is None and lineage["config"]["max_steps"] == 2
    events = await pool.fetch("SELECT from_status, to_status FROM adapter_events WHERE version = $1 ORDER BY id",
                              adapter["version"])
    path = [(None, "training"), ("training", verdict)] + ([("candidate", "canary")] if verdict == "candidate" else [])
    assert [(e["from_status"], e["to_status"]) for e in events] == path
    assert await redis.get(LOCK_KEY) is None  # released after the run
    assert await worker.cycle() is None  # the watermark moved: the same feedback does not trigger again


async def test_a_run_without_usable_data_does_nothing_and_says_why(settings, backends):
    pool, redis = backends
    await seed_feedback(pool, prompts=3, edits=False)
    await pool.execute("UPDATE feedback SET retracted_at = now() WHERE value = 1")  # downs only: nothing to imitate
    queued = await runs.queue(pool, algorithm="sft", params={"algorithm": "sft"}, requested_by="test")
    assert await Worker(settings, pool, redis).cycle() == queued["id"]
    run = await runs.get(pool, queued["id"])
    assert run["status"] == "succeeded" and "sft needs at least 1 training rows" in run["metrics"]["note"]
    assert await pool.fetchval("SELECT count(*) FROM adapters") == 0


async def test_rl_without_a_trusted_reward_model_trains_nothing_and_says_why(settings, backends):
    """rl optimises the judge: thumbs on 12 prompts hold out 2 pairs, too few to trust (6 of 6 right is the least)."""
    pool, redis = backends
    await seed_feedback(pool, prompts=12, edits=False)  # 10 training pairs: the judge trains with a lower minimum
    settings = msgspec.structs.replace(settings, training=msgspec.structs.replace(  # only the run's held-out split
        settings.training, reward_min_pairs=8, reward_validation_share=0.0))
    queued = await runs.queue(pool, algorithm="rl", params={"algorithm": "rl"}, requested_by="test")
    assert await Worker(settings, pool, redis).cycle() == queued["id"]
    run = await runs.get(pool, queued["id"])
    assert run["status"] == "succeeded", run["error"]
    assert "rl optimises the run's reward model, which must be trusted" in run["metrics"]["note"]
    assert '"heldout_accuracy"' in run["metrics"]["note"]  # the judge was trained: the note shows why it falls short
    assert await pool.fetchval("SELECT array_agg(DISTINCT status) FROM adapters") == ["failed"]


def _start_worker(settings: Settings) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_DATABASE_URL=settings.database_url, FLYWHEEL_REDIS_URL=settings.redis_url,
               FLYWHEEL_MODEL_DIR=str(settings.model_dir), FLYWHEEL_DATA_DIR=str(settings.data_dir),
               FLYWHEEL_TRAIN_POLL_S="0.5", FLYWHEEL_TRAIN_MIN_NEW="100000")
    return subprocess.Popen([sys.executable, "-m", "worker"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


async def _until_training(pool, run_id: int, process: subprocess.Popen, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while True:
        run = await runs.get(pool, run_id)
        if run["status"] == "running" and run["progress"].get("step", 0) >= 1:
            return run
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, f"run still {run['status']}"
        await asyncio.sleep(0.5)


async def test_a_killed_worker_leaves_a_failed_run_a_free_lock_and_no_adapter(settings, backends, default_model):
    pool, redis = backends
    await seed_feedback(pool, prompts=12)
    queued = await runs.queue(pool, algorithm="sft", params={"algorithm": "sft", "max_steps": 10_000},
                              requested_by="test")
    process = _start_worker(settings)
    try:
        run = await _until_training(pool, queued["id"], process)
        # Meanwhile a second worker neither trains nor starts a parallel run.
        other = Worker(settings, pool, redis)
        assert await other.cycle() is None
        second = await runs.queue(pool, algorithm="sft", params={}, requested_by="test")
        assert await runs.start(pool, second["id"], other.id) is None  # the database allows one running run
        process.kill()
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert (await redis.get(LOCK_KEY)).decode() == run["worker"]  # the dead worker's lock outlives it...

    await Worker(settings, pool, redis).recover(holding_lock=False)  # ...until the next worker starts
    failed = await runs.get(pool, queued["id"])
    assert failed["status"] == "failed" and run["worker"] in failed["error"]
    assert await redis.get(LOCK_KEY) is None
    adapter = await pool.fetchrow("SELECT status, path FROM adapters WHERE run_id = $1", queued["id"])
    assert adapter["status"] == "failed" and adapter["path"] is None
    assert await pool.fetchval("SELECT count(*) FROM adapters WHERE status NOT IN ('failed')") == 0


async def test_sigterm_cancels_the_run_cleanly(settings, backends, default_model):
    pool, redis = backends
    await seed_feedback(pool, prompts=12)
    queued = await runs.queue(pool, algorithm="sft", params={"algorithm": "sft", "max_steps": 10_000},
                              requested_by="test")
    process = _start_worker(settings)
    try:
        await _until_training(pool, queued["id"], process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0
    finally:
        if process.poll() is None:
            process.kill()
    run = await runs.get(pool, queued["id"])
    assert run["status"] == "cancelled" and run["finished_at"] is not None
    assert await pool.fetchval("SELECT status FROM adapters WHERE run_id = $1", queued["id"]) == "failed"
    assert await redis.get(LOCK_KEY) is None


async def _votes(pool, version, up: int, down: int) -> None:
    owner = await pool.fetchval("INSERT INTO api_keys (name, role, key_hash, key_prefix) VALUES ($1, 'user', $1, "
                                "'fw-') RETURNING id", f"voter-{version}-{up}-{down}")
    cid = await pool.fetchval("INSERT INTO conversations (owner) VALUES ($1) RETURNING id", owner)
    for value in [1] * up + [-1] * down:
        message = await pool.fetchval(
            "INSERT INTO messages (conversation_id, role, content, adapter_version, completion_tokens) "
            "VALUES ($1, 'assistant', 'a', $2, 1) RETURNING id", cid, version)
        await pool.execute("INSERT INTO feedback (message_id, owner, kind, value) VALUES ($1, $2, 'thumb', $3)",
                           message, owner, value)


@pytest.mark.parametrize(("canary_votes", "expected"), [((70, 10), "production"), ((20, 60), "rejected")])
async def test_auto_rollout_promotes_a_better_canary_and_rejects_a_worse_one(settings, backends, canary_votes,
                                                                          expected, tmp_path):
    from service.adapters import registry

    pool, redis = backends
    files = checksummed_files(tmp_path)
    versions = [await pool.fetchval("INSERT INTO adapters (name, base_model, algorithm, status, path, sha256, "
                                    "size_bytes) VALUES ($1, 'b', 'sft', 'candidate', $2, $3, $4) RETURNING version",
                                    name, *files) for name in ("prod", "new")]
    async with pool.acquire() as conn, conn.transaction():
        await registry.promote(conn, versions[0], actor="test", reason=None)
        await registry.start_canary(conn, versions[1], 10, actor="test", reason=None)
    await _votes(pool, versions[0], 40, 40)
    await _votes(pool, versions[1], *canary_votes)
    worker = Worker(settings, pool, redis)
    await worker.roll_out()
    assert await pool.fetchval("SELECT status FROM adapters WHERE version = $1", versions[1]) == expected
    reason = await pool.fetchval("SELECT reason FROM adapter_events WHERE version = $1 ORDER BY id DESC LIMIT 1",
                                 versions[1])
    numbers = json.loads(reason)
    assert numbers["canary"]["up"] == canary_votes[0] and numbers["production"]["votes"] == 80 and "p" in numbers
