"""One round of the learning loop through the real product, with tiny settings: users who want short answers chat,
vote and edit through the API; the worker trains and gates; the operator promotes; held-out answers get shorter.

This is bench/loop.py's round at test size (bench/users.py's Concise user, bench/prompts.py's split). It asserts
direction, not the benchmark's targets: approval of greedy answers to held-out prompts no user asked goes up.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis.asyncio as aioredis

from bench.prompts import load_prompts, split
from bench.users import make_user
from service import db
from service.settings import Settings
from tests.integration.service_process import service_on_fresh_database
from worker.loop import LOCK_KEY, Worker

pytestmark = pytest.mark.slow
ADMIN = "test-admin-key-learning-round"
HELDOUT = 8
VOTES = 16


@pytest.fixture(scope="module")
def learning_service(postgres_server_url, template_database, redis_url, model_dir, default_model, shared_tmp):
    with service_on_fresh_database(postgres_server_url, template_database, shared_tmp, FLYWHEEL_REDIS_URL=redis_url,
                                   FLYWHEEL_MODEL_DIR=str(model_dir), FLYWHEEL_ADMIN_KEY=ADMIN,
                                   FLYWHEEL_RATE_LIMIT_PER_MIN="0", FLYWHEEL_AUTO_ROLLOUT="false",
                                   FLYWHEEL_HELDOUT_FRACTION="0.3", FLYWHEEL_REWARD_MIN_PAIRS="0") as process:
        yield process


def _chat(http: httpx.Client, key: str, prompt: str, temperature: float) -> dict:
    body = {"model": "flywheel", "messages": [{"role": "user", "content": prompt}], "max_tokens": 96,
            "temperature": temperature, **({"seed": len(prompt)} if temperature else {})}
    response = http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()


def _together(calls) -> list:
    """Concurrent requests, as users make them: the engine decodes them in one batch."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda call: call(), calls))


def _approval(http: httpx.Client, user, prompts: list[str]) -> float:
    replies = _together([lambda p=p: _chat(http, ADMIN, p, 0.0) for p in prompts])
    answers = [r["choices"][0]["message"]["content"] for r in replies]
    return sum(user.approves(p, a) for p, a in zip(prompts, answers, strict=True)) / len(prompts)


def test_a_round_of_edits_makes_held_out_answers_what_users_want(learning_service):
    parts = split(load_prompts())
    train, heldout = [p.text for p in parts["train"]][:VOTES], [p.text for p in parts["heldout"]][:HELDOUT]
    keys = [learning_service.new_key(f"learner-{i}") for i in range(6)]  # >= 5: the per-owner cap keeps them all
    users = [make_user("concise", edit_rate=1.0, seed=i) for i in range(len(keys))]
    judge = make_user("concise")
    with httpx.Client(base_url=learning_service.url, timeout=300) as http:
        before = _approval(http, judge, heldout)
        replies = _together([lambda i=i, p=p: _chat(http, keys[i % len(keys)], p, 0.9) for i, p in enumerate(train)])
        for i, (prompt, reply) in enumerate(zip(train, replies, strict=True)):
            reaction = users[i % len(users)].react(prompt, reply["choices"][0]["message"]["content"])
            for body in reaction.feedback():
                response = http.put(f"/api/messages/{reply['flywheel']['message_id']}/feedback", json=body,
                                    headers={"Authorization": f"Bearer {keys[i % len(keys)]}"})
                assert response.status_code in (200, 201), response.text
        admin = {"Authorization": f"Bearer {ADMIN}"}
        run = http.post("/api/runs", json={"algorithm": "sft", "max_steps": 20}, headers=admin).json()

        settings = Settings.from_env({k: v for k, v in learning_service.env.items() if k.startswith("FLYWHEEL_")})
        assert asyncio.run(_work(settings)) == run["id"]
        run = http.get(f"/api/runs/{run['id']}", headers=admin).json()
        assert run["status"] == "succeeded", run
        metrics = run["metrics"] if isinstance(run["metrics"], dict) else json.loads(run["metrics"])
        assert metrics["verdict"] == "candidate", metrics["gate_reasons"]
        assert metrics["stages"][0]["algorithm"] == "sft" and metrics["changed_share"] > 0
        version = metrics["adapter_version"]
        assert http.post(f"/api/adapters/{version}/promote", json={"reason": "test round"},
                         headers=admin).status_code == 200
        for _ in range(120):
            if http.get("/ready").json()["serving"]["production"] == version:
                break
            time.sleep(0.5)
        after = _approval(http, judge, heldout)
    assert after > before, (before, after)


async def _work(settings: Settings) -> int | None:
    pool = await db.create_pool(settings.database_url, 2)
    redis = aioredis.from_url(settings.redis_url)
    try:
        await redis.delete(LOCK_KEY)
        return await Worker(settings, pool, redis).cycle()
    finally:
        await redis.aclose()
        await pool.close()
