"""Feedback through the API of a real service process: capture, validation, upsert, retraction, flags, export."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest

from service import db
from tests.integration.conftest import ADMIN_KEY

pytestmark = pytest.mark.slow


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _fetch(database_url: str, query: str, *args):
    pool = await db.create_pool(database_url, 1)
    try:
        return await pool.fetch(query, *args)
    finally:
        await pool.close()


@pytest.fixture(scope="module")
def chat(service):
    """Alice's conversation: system, user, two sibling answers; Bob's own conversation with one answer."""
    alice, bob = service.new_key("alice"), service.new_key("bob")
    with httpx.Client(base_url=service.url, timeout=120) as client:
        cid = client.post("/api/conversations", headers=_auth(alice), json={"system": "Be brief."}).json()["id"]
        first = client.post(f"/api/conversations/{cid}/messages", headers=_auth(alice),
                            json={"content": "Name a fruit.", "stream": False, "max_tokens": 8}).json()["flywheel"]
        second = client.post(f"/api/messages/{first['message_id']}/regenerate", headers=_auth(alice),
                             json={"stream": False, "max_tokens": 8, "temperature": 1.0, "seed": 3}).json()
        bobs = client.post("/v1/chat/completions", headers=_auth(bob), json={
            "model": "base", "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8}).json()
        messages = client.get(f"/api/conversations/{cid}", headers=_auth(alice)).json()["messages"]
    return {"alice": alice, "bob": bob, "a1": first["message_id"], "a2": second["flywheel"]["message_id"],
            "user": first["parent_id"], "system": messages[0]["id"], "b1": bobs["flywheel"]["message_id"],
            "a1_text": messages[2]["content"]}


def test_every_bad_feedback_is_a_4xx_naming_the_problem(service, chat):
    a1 = chat["a1"]
    cases = [
        (str(uuid.uuid4()), {"kind": "thumb", "value": 1}, 404, "message_id"),
        (chat["b1"], {"kind": "thumb", "value": 1}, 404, "message_id"),  # bob's reply: not alice's to rate
        (chat["user"], {"kind": "thumb", "value": 1}, 400, "message_id"),
        (chat["system"], {"kind": "rating", "value": 3}, 400, "message_id"),
        (a1, {"kind": "thumb", "value": 0}, 400, "value"),
        (a1, {"kind": "rating", "value": 6}, 400, "value"),
        (a1, {"kind": "rating", "value": 0}, 400, "value"),
        (a1, {"kind": "edit", "content": "   "}, 400, "content"),
        (a1, {"kind": "edit", "content": "x" * 50000}, 400, "content"),
        (a1, {"kind": "edit", "content": chat["a1_text"]}, 400, "content"),
        (a1, {"kind": "comparison", "preferred_message_id": chat["b1"]}, 400, "preferred_message_id"),
        (a1, {"kind": "comparison", "preferred_message_id": "not-a-uuid"}, 400, "preferred_message_id"),
        (a1, {"kind": "applause"}, 400, "kind"),
        (a1, {"value": 1}, 400, "kind"),
        (a1, {"kind": "thumb", "value": 1, "stars": 5}, 400, "stars"),
        (a1, {"kind": "rating", "value": 4, "content": "x"}, 400, "content"),
    ]
    with httpx.Client(base_url=service.url, headers=_auth(chat["alice"]), timeout=30) as client:
        for message_id, body, status, field in cases:
            response = client.put(f"/api/messages/{message_id}/feedback", json=body)
            assert response.status_code == status, (body, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["field"] == field, (body, response.json())
        malformed = client.put(f"/api/messages/{a1}/feedback", content=b"{",
                               headers={"content-type": "application/json"})
        assert malformed.status_code == 400
        assert client.get(f"/api/messages/{a1}/feedback").json()["data"] == []  # nothing bad was stored


def test_a_second_vote_replaces_the_first_and_delete_retracts(service, chat):
    url = f"/api/messages/{chat['a1']}/feedback"
    with httpx.Client(base_url=service.url, headers=_auth(chat["alice"]), timeout=30) as client:
        first = client.put(url, json={"kind": "thumb", "value": 1, "tags": ["helpful", "helpful"]})
        assert first.status_code == 201 and first.json()["created"] is True
        assert first.json()["feedback"]["tags"] == ["helpful"]
        second = client.put(url, json={"kind": "thumb", "value": -1, "comment": "wrong fruit"})
        assert second.status_code == 200 and second.json()["feedback"]["id"] == first.json()["feedback"]["id"]
        assert client.put(url, json={"kind": "rating", "value": 2}).status_code == 201
        mine = client.get(url).json()["data"]
        assert sorted((f["kind"], f["value"]) for f in mine) == [("rating", 2), ("thumb", -1)]
        assert client.delete(url, params={"kind": "thumb"}).status_code == 204
        assert [f["kind"] for f in client.get(url).json()["data"]] == ["rating"]
        assert client.delete(url).status_code == 204
        assert client.get(url).json()["data"] == []
    rows = asyncio.run(_fetch(service.database_url, "SELECT kind, retracted_at FROM feedback WHERE message_id = $1",
                              uuid.UUID(chat["a1"])))
    assert len(rows) == 2 and all(r["retracted_at"] is not None for r in rows)  # kept for the audit


def test_one_choice_among_siblings_per_owner(service, chat):
    with httpx.Client(base_url=service.url, headers=_auth(chat["alice"]), timeout=30) as client:
        chose_a2 = client.put(f"/api/messages/{chat['a1']}/feedback",
                              json={"kind": "comparison", "preferred_message_id": chat["a2"]})
        assert chose_a2.status_code == 201, chose_a2.text
        changed_mind = client.put(f"/api/messages/{chat['a2']}/feedback",
                                  json={"kind": "comparison", "preferred_message_id": chat["a1"]})
        assert changed_mind.status_code == 200  # the same choice, revised: still one row
        seen_from_a1 = client.get(f"/api/messages/{chat['a1']}/feedback").json()["data"]
        assert [(f["kind"], f["preferred_message_id"]) for f in seen_from_a1] == [("comparison", chat["a1"])]
        export = client.get("/api/export", params={"format": "dpo"}, headers=_auth(ADMIN_KEY))
    rows = [json.loads(line) for line in export.text.splitlines()]
    assert any(r["chosen"][0]["content"] == chat["a1_text"] and r["prompt"][-1]["content"] == "Name a fruit."
               for r in rows)


def test_concurrent_votes_by_one_owner_end_as_one_row(service, chat):
    async def storm():
        async with httpx.AsyncClient(base_url=service.url, headers=_auth(chat["bob"]), timeout=60) as client:
            votes = [client.put(f"/api/messages/{chat['b1']}/feedback", json={"kind": "thumb", "value": v})
                     for v in [1, -1] * 12]
            return await asyncio.gather(*votes)

    responses = asyncio.run(storm())
    assert all(r.status_code in (200, 201) for r in responses)
    assert sum(r.status_code == 201 for r in responses) == 1
    rows = asyncio.run(_fetch(service.database_url, "SELECT value FROM feedback WHERE message_id = $1 "
                              "AND kind = 'thumb'", uuid.UUID(chat["b1"])))
    assert len(rows) == 1 and rows[0]["value"] in (1, -1)


def test_apps_rate_replies_from_the_openai_endpoint_by_message_id(service, chat):
    with httpx.Client(base_url=service.url, headers=_auth(chat["bob"]), timeout=30) as client:
        response = client.put(f"/api/messages/{chat['b1']}/feedback", json={"kind": "edit", "content": "Apple."})
        assert response.status_code == 201


def test_flagged_keys_are_kept_but_left_out_of_exports(service, chat):
    operator = service.new_key("ops", role="operator")
    with httpx.Client(base_url=service.url, timeout=30) as client:
        client.put(f"/api/messages/{chat['b1']}/feedback", headers=_auth(chat["bob"]),
                   json={"kind": "edit", "content": "Banana."})
        before = client.get("/api/export", params={"format": "sft"}, headers=_auth(operator))
        assert before.status_code == 200 and "Banana." in before.text
        bob_id = asyncio.run(_fetch(service.database_url, "SELECT id FROM api_keys WHERE name = 'bob'"))[0]["id"]
        assert client.post(f"/api/admin/keys/{bob_id}/flag", headers=_auth(chat["alice"])).status_code == 403
        assert client.post("/api/admin/keys/999999/flag", headers=_auth(operator)).status_code == 404
        flagged = client.post(f"/api/admin/keys/{bob_id}/flag", headers=_auth(operator), json={"reason": "spam"})
        assert flagged.status_code == 200
        after = client.get("/api/export", params={"format": "sft"}, headers=_auth(operator))
        assert "Banana." not in after.text
        assert json.loads(after.headers["x-flywheel-counts"])["total"] == int(after.headers["x-flywheel-rows"])
        kept = asyncio.run(_fetch(service.database_url, "SELECT count(*) AS n FROM feedback WHERE owner = $1", bob_id))
        assert kept[0]["n"] >= 1  # flagging deletes nothing
        assert client.delete(f"/api/admin/keys/{bob_id}/flag", headers=_auth(operator)).status_code == 204
        assert "Banana." in client.get("/api/export", params={"format": "sft"}, headers=_auth(operator)).text


def test_stats_and_export_need_an_operator_and_valid_parameters(service, chat):
    with httpx.Client(base_url=service.url, timeout=30) as client:
        user, admin = _auth(chat["alice"]), _auth(ADMIN_KEY)
        assert client.get("/api/stats", headers=user).status_code == 403
        assert client.get("/api/export", params={"format": "sft"}, headers=user).status_code == 403
        bad_format = client.get("/api/export", params={"format": "csv"}, headers=admin)
        assert bad_format.status_code == 400 and bad_format.json()["field"] == "format"
        assert client.get("/api/export", headers=admin).status_code == 400  # format is required
        assert client.get("/api/adapters/vx/stats", headers=admin).status_code == 400
        assert client.get("/api/adapters/999/stats", headers=admin).status_code == 404
        bad_since = client.get("/api/stats", params={"since": "yesterday"}, headers=admin)
        assert bad_since.status_code == 400
        stats = client.get("/api/adapters/base/stats", headers=admin).json()
        assert stats["model"] == "base" and stats["totals"]["replies"] >= 3
