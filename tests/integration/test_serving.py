"""The chat service as apps see it: a real `flywheel serve` process, the real default model, real Postgres/Redis,
and the unmodified OpenAI SDK."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid

import httpx
import pytest
from openai import OpenAI

from service import db
from tests.integration.conftest import ADMIN_KEY, RATE_LIMIT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters(service, lora_adapters) -> list[str]:
    """The two test adapters, registered and loaded through the operators' endpoint."""
    names = []
    for i, path in enumerate(lora_adapters):
        response = httpx.post(f"{service.url}/v1/load_lora_adapter", headers=_auth(ADMIN_KEY),
                              json={"lora_name": f"test-a{i}", "lora_path": str(path)}, timeout=60)
        assert response.status_code == 200, response.text
        names.append(response.json()["model"])
    return names


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _client(service, key: str = ADMIN_KEY) -> OpenAI:
    return OpenAI(base_url=f"{service.url}/v1", api_key=key, max_retries=0, timeout=120)


async def _message_row(database_url: str, message_id: str):
    pool = await db.create_pool(database_url, 1)  # the product's own pool: jsonb comes back as dicts
    try:
        return await pool.fetchrow("SELECT * FROM messages WHERE id = $1", uuid.UUID(message_id))
    finally:
        await pool.close()


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_openai_sdk_without_streaming_stores_the_reply(service):
    response = _client(service).chat.completions.create(model="base", messages=QUESTION, max_tokens=24,
                                                        temperature=0)
    answer = response.choices[0].message.content
    assert answer.strip() and response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.completion_tokens > 0 and response.usage.prompt_tokens > 0
    extra = response.model_extra["flywheel"]
    assert response.id == f"chatcmpl-{extra['message_id']}" and extra["adapter_version"] is None

    row = asyncio.run(_message_row(service.database_url, extra["message_id"]))
    assert row["role"] == "assistant" and row["content"] == answer and row["adapter_version"] is None
    assert row["completion_tokens"] == response.usage.completion_tokens
    assert row["prompt_tokens"] == response.usage.prompt_tokens
    assert row["sampling"]["temperature"] == 0 and row["sampling"]["max_tokens"] == 24
    assert row["latency_ms"] > 0 and row["model"] == "base"


def test_openai_sdk_streaming_matches_the_non_streamed_answer(service):
    client = _client(service)
    whole = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(model="base", messages=QUESTION, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: same tokens, streamed or not
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    message_id = chunks[0].model_extra["flywheel"]["message_id"]
    assert asyncio.run(_message_row(service.database_url, message_id))["content"] == text


def test_concurrent_requests_on_several_adapters_get_their_own_adapters_output(service, adapters):
    prompts = ["How do I make coffee?", "Name a color."]
    models = ["base", *adapters]

    def ask(client: httpx.Client, model: str, prompt: str) -> str:
        response = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == (model if model != "base" else "base")
        return body["choices"][0]["message"]["content"]

    with httpx.Client(base_url=service.url, headers=_auth(ADMIN_KEY), timeout=120) as client:
        alone = {(m, p): ask(client, m, p) for m in models for p in prompts}
    assert len({alone[(m, prompts[0])] for m in models}) == 3  # the adapters really change the answer

    async def together():
        async with httpx.AsyncClient(base_url=service.url, headers=_auth(ADMIN_KEY), timeout=120) as client:
            async def one(model, prompt):
                response = await client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                    "temperature": 0})
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["message"]["content"]

            pairs = [(m, p) for m in models for p in prompts] * 2
            return pairs, await asyncio.gather(*(one(m, p) for m, p in pairs))

    pairs, answers = asyncio.run(together())
    assert [alone[pair] for pair in pairs] == answers


def test_a_reply_records_the_adapter_version_that_produced_it(service, adapters):
    response = _client(service).chat.completions.create(model=adapters[1], messages=QUESTION, max_tokens=8,
                                                        temperature=0)
    version = int(adapters[1].split(":v")[1])
    assert response.model == adapters[1]
    row = asyncio.run(_message_row(service.database_url, response.model_extra["flywheel"]["message_id"]))
    assert row["adapter_version"] == version


def test_models_lists_base_the_alias_and_loaded_versions(service, adapters):
    ids = [m.id for m in _client(service).models.list().data]
    assert ids[:2] == ["base", "flywheel"] and set(adapters) <= set(ids)


def test_conversation_turns_and_regenerated_siblings(service):
    key = service.new_key("conversation-user")
    with httpx.Client(base_url=service.url, headers=_auth(key), timeout=120) as client:
        conversation = client.post("/api/conversations", json={"title": "maths", "system": "Answer briefly."})
        assert conversation.status_code == 201
        cid = conversation.json()["id"]
        first = client.post(f"/api/conversations/{cid}/messages",
                            json={"content": "What is 2+2?", "stream": False, "max_tokens": 12, "temperature": 0})
        assert first.status_code == 200, first.text
        answer = first.json()["flywheel"]
        with client.stream("POST", f"/api/messages/{answer['message_id']}/regenerate",
                            json={"max_tokens": 12, "temperature": 0.9, "seed": 1}) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        messages = client.get(f"/api/conversations/{cid}").json()["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "assistant"]
        user = messages[1]
        assert messages[2]["parent_id"] == messages[3]["parent_id"] == user["id"] == answer["parent_id"]
        listed = client.get("/api/conversations").json()["data"]
        assert [c["id"] for c in listed] == [cid]


def test_a_user_cannot_see_or_touch_another_users_conversation(service):
    alice, bob = service.new_key("alice"), service.new_key("bob")
    with httpx.Client(base_url=service.url, timeout=120) as client:
        cid = client.post("/api/conversations", headers=_auth(alice), json={"title": "private"}).json()["id"]
        reply = client.post(f"/api/conversations/{cid}/messages", headers=_auth(alice),
                            json={"content": "Hello", "stream": False, "max_tokens": 4})
        message_id = reply.json()["flywheel"]["message_id"]
        for method, path, body in [("GET", f"/api/conversations/{cid}", None),
                                   ("DELETE", f"/api/conversations/{cid}", None),
                                   ("POST", f"/api/conversations/{cid}/messages", {"content": "hi"}),
                                   ("POST", f"/api/messages/{message_id}/regenerate", {})]:
            response = client.request(method, path, headers=_auth(bob), json=body)
            assert response.status_code == 404, (method, path, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
        assert client.get("/api/conversations", headers=_auth(bob)).json()["data"] == []
        assert client.get(f"/api/conversations/{cid}", headers=_auth(alice)).status_code == 200
        assert client.request("DELETE", f"/api/conversations/{cid}", headers=_auth(alice)).status_code == 204
        assert client.get(f"/api/conversations/{cid}", headers=_auth(alice)).status_code == 404


def test_rate_limit_answers_429_with_retry_after(service):
    key = service.new_key("hasty")
    if 60 - time.time() % 60 < 30:  # limits count per clock minute: keep the burst inside one
        time.sleep(60 - time.time() % 60 + 0.5)
    with httpx.Client(base_url=service.url, headers=_auth(key), timeout=30) as client:
        codes = [client.get("/v1/models").status_code for _ in range(RATE_LIMIT + 5)]
        limited = client.get("/v1/models")
    assert codes[:RATE_LIMIT - 5].count(200) == RATE_LIMIT - 5  # well under the limit: all pass
    assert 429 in codes and limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.json()["error"]["type"] == "rate_limited"


LONG = "word " * 7000  # ~7,000 tokens: two of them overflow the 8,192-token context


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "base", "messages": []}, "messages"),
        ({"model": "no-such-model", "messages": QUESTION}, "model"),
        ({"model": "base", "messages": QUESTION, "tools": []}, "tools"),
        ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": "base", "messages": QUESTION, "temperature": "hot"}, "temperature"),
        ({"model": "base", "messages": QUESTION, "temperature": 3}, "temperature"),
        ({"model": "base", "messages": QUESTION, "n": 2}, "n"),
        ({"model": "base", "messages": QUESTION, "max_tokens": 10**6}, "max_tokens"),
        ({"model": "base", "messages": [{"role": "user", "content": "  "}]}, "messages[0].content"),
        ({"model": "base", "messages": [*QUESTION, {"role": "assistant", "content": "Paris"}]}, "messages[1].role"),
        ({"model": "base", "messages": [*QUESTION, {"role": "system", "content": "late"}, *QUESTION]},
         "messages[1].role"),
        ({"model": "base", "messages": [{"role": "user", "content": "x" * 50000}]}, "messages[0].content"),
        ({"model": "base", "messages": [{"role": "user", "content": LONG}, {"role": "assistant", "content": LONG},
                                        {"role": "user", "content": "and?"}]}, "messages"),
        ({"messages": QUESTION}, "model"),
    ],
)
def test_bad_chat_requests_get_a_400_class_error_naming_the_field(service, body, param):
    response = httpx.post(f"{service.url}/v1/chat/completions", headers=_auth(ADMIN_KEY), json=body, timeout=120)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_malformed_json_and_missing_key(service):
    bad_json = httpx.post(f"{service.url}/v1/chat/completions", headers={**_auth(ADMIN_KEY),
                          "content-type": "application/json"}, content=b"{not json")
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    assert httpx.get(f"{service.url}/v1/models").status_code == 401
    assert httpx.get(f"{service.url}/api/conversations", headers=_auth("fw-nope")).status_code == 401


def test_a_client_that_disconnects_frees_its_slot(service):
    body = {"model": "base", "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=service.url, headers=_auth(ADMIN_KEY), timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            next(line for line in lines if '"content"' in line)
        message_id = first.split('"message_id":"')[1].split('"')[0]
        deadline = time.monotonic() + 20
        while "flywheel_running_requests 0.0" not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "the abandoned request kept its slot"
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while (row := asyncio.run(_message_row(service.database_url, message_id))) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert row["finish_reason"] == "abort" and row["completion_tokens"] < 2000


def test_a_corrupt_adapter_is_refused_while_serving_continues(service, lora_adapters, shared_tmp):
    copy = shared_tmp / "adapter-to-corrupt"
    shutil.copytree(lora_adapters[0], copy)
    with httpx.Client(base_url=service.url, headers=_auth(ADMIN_KEY), timeout=120) as client:
        loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "to-corrupt", "lora_path": str(copy)})
        assert loaded.status_code == 200, loaded.text
        model = loaded.json()["model"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "to-corrupt"}).status_code == 200
        weights = copy / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100] + b"\x00" * 100)  # flipped bytes on disk

        async def both():
            async with httpx.AsyncClient(base_url=service.url, headers=_auth(ADMIN_KEY), timeout=120) as c:
                long_running = c.post("/v1/chat/completions", json={
                    "model": "base", "messages": QUESTION, "max_tokens": 32, "ignore_eos": True})
                corrupt = c.post("/v1/chat/completions", json={"model": model, "messages": QUESTION})
                return await asyncio.gather(long_running, corrupt)

        served, refused = asyncio.run(both())
        assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 32
        assert refused.status_code == 503 and "checksum" in refused.json()["error"]["message"]
        # A folder that is not an adapter at all is refused at load and never registered.
        broken = client.post("/v1/load_lora_adapter", json={"lora_name": "broken", "lora_path": str(shared_tmp)})
        assert broken.status_code == 400 and broken.json()["error"]["param"] == "lora_path"
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert model not in models
        assert client.get("/ready").status_code == 200


def test_metrics_expose_requests_tokens_and_latency(service):
    _client(service).chat.completions.create(model="base", messages=QUESTION, max_tokens=4)
    text = httpx.get(f"{service.url}/metrics").text
    for name in ("flywheel_requests_total", "flywheel_completion_tokens_total",
                 "flywheel_time_to_first_token_seconds_bucket", "flywheel_request_latency_seconds_count",
                 "flywheel_queue_depth", "flywheel_loaded_adapters"):
        assert name in text


def test_only_operators_load_adapters(service, lora_adapters):
    user = service.new_key("plain-user")
    response = httpx.post(f"{service.url}/v1/load_lora_adapter", headers=_auth(user),
                          json={"lora_name": "sneaky", "lora_path": str(lora_adapters[0])})
    assert response.status_code == 403 and "operator" in response.json()["error"]["message"]
