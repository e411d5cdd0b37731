"""The UI's REST client: every call the UI makes to a Flywheel API, and what its failures mean to a person.

It speaks HTTP only (httpx), so the UI runs against any Flywheel URL, local or remote. Failures become ``ApiError``
with a sentence a user can act on (bad key, rate limited, server down) rather than a status code or a traceback.
The key travels in the Authorization header and is never logged or put in an error message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

TIMEOUT = httpx.Timeout(30.0, read=300.0)  # a reply on CPU can take minutes; connecting should not


class ApiError(Exception):
    """A call failed; ``str()`` is what to show the user, ``status`` the HTTP status (0: no answer at all)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Me:
    key_id: int
    name: str
    role: str

    @property
    def is_operator(self) -> bool:
        return self.role in ("operator", "admin")


def explain(response: httpx.Response) -> ApiError:
    """The API's problem details (or OpenAI error body) as one sentence for a person."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    detail = body.get("detail") or body.get("error", {}).get("message") or response.reason_phrase
    status = response.status_code
    if status == 401:
        return ApiError(f"The API key was refused ({detail}). Check it and sign in again.", status)
    if status == 403:
        return ApiError(f"Not allowed: {detail}.", status)
    if status == 429:
        wait = response.headers.get("retry-after")
        return ApiError(f"Rate limited: {detail}. Try again in {wait or 'a few'} seconds; your text is kept.", status)
    if status >= 500:
        return ApiError(f"The service could not answer ({status}: {detail}). Try again shortly.", status)
    return ApiError(str(detail), status)


@dataclass(frozen=True)
class Session:
    """A signed-in browser session (kept in Gradio's per-session state); the key is left out of any repr."""

    key: str = field(repr=False)
    me: Me


class FlywheelClient:
    """One signed-in caller's view of the API. Cheap to build: the UI makes one per event."""

    def __init__(self, api_url: str, key: str):
        self.api_url = api_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {key}"}

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.api_url, headers=self._headers, timeout=TIMEOUT)

    def _down(self, exc: httpx.HTTPError) -> ApiError:
        return ApiError(f"The Flywheel API at {self.api_url} does not answer ({type(exc).__name__}). "
                        "Is the service running? Your text is kept.")

    async def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            async with self._client() as client:
                response = await client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise self._down(exc) from exc
        if response.is_error:
            raise explain(response)
        return response

    async def json(self, method: str, path: str, **kwargs) -> Any:
        return (await self.request(method, path, **kwargs)).json()

    async def stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        """POST and yield the server-sent events of a streamed reply, as dicts; an error event raises ApiError."""
        try:
            async with self._client() as client, client.stream("POST", path, json={**body, "stream": True}) as response:
                if response.is_error:
                    await response.aread()
                    raise explain(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[len("data: "):])
                    if "error" in event:
                        raise ApiError(f"The reply was interrupted: {event['error'].get('message')}. Try again.")
                    yield event
        except httpx.HTTPError as exc:
            raise self._down(exc) from exc

    # --- the calls the UI makes -----------------------------------------------------------------------------------
    async def me(self) -> Me:
        body = await self.json("GET", "/api/me")
        return Me(body["key_id"], body["name"], body["role"])

    async def conversations(self) -> list[dict]:
        return (await self.json("GET", "/api/conversations", params={"limit": 100}))["data"]

    async def create_conversation(self, title: str) -> dict:
        return await self.json("POST", "/api/conversations", json={"title": title[:200]})

    async def conversation(self, conversation_id: str) -> dict:
        return await self.json("GET", f"/api/conversations/{conversation_id}")

    async def delete_conversation(self, conversation_id: str) -> None:
        await self.request("DELETE", f"/api/conversations/{conversation_id}")

    def send(self, conversation_id: str, content: str, parent_id: str | None,
             sampling: dict | None = None) -> AsyncIterator[dict]:
        """``sampling``: the API's sampling fields (temperature, seed, ...); unset ones take its defaults."""
        body = {"content": content, **({"parent_id": parent_id} if parent_id else {}), **(sampling or {})}
        return self.stream(f"/api/conversations/{conversation_id}/messages", body)

    def regenerate(self, message_id: str, sampling: dict | None = None) -> AsyncIterator[dict]:
        return self.stream(f"/api/messages/{message_id}/regenerate", sampling or {})

    async def feedback(self, message_id: str) -> list[dict]:
        return (await self.json("GET", f"/api/messages/{message_id}/feedback"))["data"]

    async def put_feedback(self, message_id: str, body: dict) -> dict:
        return (await self.json("PUT", f"/api/messages/{message_id}/feedback", json=body))["feedback"]

    async def retract_feedback(self, message_id: str, kind: str) -> None:
        await self.request("DELETE", f"/api/messages/{message_id}/feedback", params={"kind": kind})

    async def adapters(self) -> list[dict]:
        return (await self.json("GET", "/api/adapters"))["data"]

    async def operate(self, operation: str, version: int | None, reason: str, percent: int | None = None) -> dict:
        if operation == "rollback":
            return await self.json("POST", "/api/adapters/rollback", json={"reason": reason})
        body = {"reason": reason, **({"percent": percent} if operation == "canary" else {})}
        return await self.json("POST", f"/api/adapters/{version}/{operation}", json=body)

    async def stats(self) -> list[dict]:
        return (await self.json("GET", "/api/stats"))["adapters"]

    async def runs(self) -> list[dict]:
        return (await self.json("GET", "/api/runs", params={"limit": 50}))["data"]

    async def start_run(self, algorithm: str) -> dict:
        return await self.json("POST", "/api/runs", json={"algorithm": algorithm})

    async def export(self, fmt: str) -> tuple[bytes, int]:
        """(the JSONL, its row count)."""
        response = await self.request("GET", "/api/export", params={"format": fmt})
        return response.content, int(response.headers.get("x-flywheel-rows", "0"))
