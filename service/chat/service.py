"""Chat: validate, route to an adapter, generate, stream, and store every reply with what produced it.

Every assistant reply becomes a message row carrying its adapter version, sampling settings, token counts and
latency, so feedback on it can be traced to exactly one model. OpenAI-style calls get a conversation of their own;
conversation calls answer after the chosen message (regenerations are siblings with the same parent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis

from service.adapters.service import AdapterService, Target
from service.auth import Caller, check_token_budget, record_tokens
from service.chat import store
from service.chat.schemas import ChatCompletionRequest, ChatMessage, SamplingFields
from service.engine.base import (
    AdapterNotLoaded,
    Chunk,
    Engine,
    EngineOverloaded,
    GenerationRequest,
    PromptTooLong,
    SamplingParams,
)
from service.errors import ClientError, NotFound, Unavailable
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """What one generation produced, filled in as chunks arrive."""

    target: Target
    sampling: SamplingParams
    message_id: uuid.UUID
    conversation_id: uuid.UUID
    started: float = field(default_factory=time.perf_counter)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None

    def add(self, chunk: Chunk) -> None:
        if chunk.text and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.text += chunk.text
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens

    @property
    def latency_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    def columns(self, requested_model: str) -> dict:
        s = self.sampling
        sampling = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens, "stop": list(s.stop),
                    "seed": s.seed, "frequency_penalty": s.frequency_penalty, "presence_penalty": s.presence_penalty}
        return {"adapter_version": self.target.version, "model": requested_model, "sampling": sampling,
                "finish_reason": self.finish_reason or "abort", "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "latency_ms": self.latency_ms}

    def extra(self, **more) -> dict:
        return {"message_id": str(self.message_id), "conversation_id": str(self.conversation_id),
                "adapter_version": self.target.version, "model": self.target.label, **more}


class ChatService:
    def __init__(self, pool: asyncpg.Pool, redis: aioredis.Redis, engine: Engine, adapters: AdapterService,
                 settings: Settings, metrics: Metrics):
        self.pool, self.redis, self.engine, self.adapters = pool, redis, engine, adapters
        self.settings, self.metrics = settings, metrics
        self._background: set[asyncio.Task] = set()

    # --- OpenAI-compatible ------------------------------------------------------------------------------------
    async def complete(self, caller: Caller, request: ChatCompletionRequest):
        """A completion dict, or an async iterator of SSE bytes when ``request.stream``."""
        messages = self._validate(request.messages)
        sampling = self._sampling(request)
        target = await self.adapters.resolve(request.model, caller)
        reply = Reply(target, sampling, uuid.uuid4(), uuid.uuid4())

        async def persist(done: Reply) -> None:
            async with self.pool.acquire() as conn, conn.transaction():
                title = next((m["content"] for m in messages if m["role"] == "user"), "")[:80]
                await store.create_conversation(conn, caller.owner, title, done.conversation_id)
                parent = None
                for m in messages:
                    row = await store.insert_message(conn, conversation_id=done.conversation_id, role=m["role"],
                                                     content=m["content"], parent_id=parent)
                    parent = row["id"]
                await store.insert_message(conn, conversation_id=done.conversation_id, role="assistant",
                                           content=done.text, parent_id=parent, message_id=done.message_id,
                                           **done.columns(request.model))

        chunks = await self._start(caller, reply, messages)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        if request.stream:
            return self._sse(chunks, reply, persist, include_usage)
        async for _ in chunks:  # the chunks fill in ``reply``
            pass
        self._check_finished(reply)
        await persist(reply)
        return completion_body(reply)

    # --- conversations ----------------------------------------------------------------------------------------
    async def create_conversation(self, caller: Caller, title: str, system: str | None):
        async with self.pool.acquire() as conn, conn.transaction():
            row = await store.create_conversation(conn, caller.owner, title)
            if system:
                self._check_length(system, "system")
                await store.insert_message(conn, conversation_id=row["id"], role="system", content=system)
        return dict(row)

    async def list_conversations(self, caller: Caller, limit: int, offset: int):
        return [dict(r) for r in await store.list_conversations(self.pool, caller.owner, limit, offset)]

    async def get_conversation(self, caller: Caller, conversation_id: uuid.UUID):
        row = await self._visible_conversation(caller, conversation_id)
        messages = await store.conversation_messages(self.pool, conversation_id)
        return {**dict(row), "messages": [dict(m) for m in messages]}

    async def delete_conversation(self, caller: Caller, conversation_id: uuid.UUID) -> None:
        await self._visible_conversation(caller, conversation_id)
        await store.delete_conversation(self.pool, conversation_id)

    async def post_message(self, caller: Caller, conversation_id: uuid.UUID, content: str, model: str,
                           parent_id: str | None, body: SamplingFields, stream: bool):
        """Add a user turn and answer it; the user turn is stored before generation starts."""
        await self._visible_conversation(caller, conversation_id)
        self._check_length(content, "content")
        if parent_id is None:
            parent = await store.latest_message(self.pool, conversation_id)
        else:
            parent = await store.get_message(self.pool, _uuid(parent_id, "parent_id"))
            if parent is None or parent["conversation_id"] != conversation_id:
                raise NotFound("parent_id is not a message of this conversation", field="parent_id")
        history = await store.context_chain(self.pool, parent["id"]) if parent else []
        messages = [*({"role": m["role"], "content": m["content"]} for m in history), {"role": "user",
                                                                                         "content": content}]
        self._validate_roles(messages)
        target = await self.adapters.resolve(model, caller)
        user_row = await store.insert_message(self.pool, conversation_id=conversation_id, role="user",
                                              content=content, parent_id=parent["id"] if parent else None)
        return await self._answer(caller, target, model, messages, body, stream, conversation_id, user_row["id"])

    async def regenerate(self, caller: Caller, message_id: uuid.UUID, model: str, body: SamplingFields,
                         stream: bool):
        """Answer the same context again: a sibling of ``message_id`` for pairwise comparison."""
        row = await store.get_message(self.pool, message_id)
        if row is None or row["deleted_at"] is not None or not caller.may_see(row["owner"]):
            raise NotFound("no such message", field="message_id")
        if row["role"] != "assistant" or row["parent_id"] is None:
            raise ClientError("only an assistant reply can be regenerated", field="message_id")
        history = await store.context_chain(self.pool, row["parent_id"])
        messages = [{"role": m["role"], "content": m["content"]} for m in history]
        target = await self.adapters.resolve(model, caller)
        return await self._answer(caller, target, model, messages, body, stream, row["conversation_id"],
                                  row["parent_id"], regenerated_from=str(message_id))

    async def _answer(self, caller, target, model, messages, body, stream, conversation_id, parent_id, **extra):
        sampling = self._sampling(body)
        reply = Reply(target, sampling, uuid.uuid4(), conversation_id)

        async def persist(done: Reply) -> None:
            await store.insert_message(self.pool, conversation_id=conversation_id, role="assistant",
                                       content=done.text, parent_id=parent_id, message_id=done.message_id,
                                       **done.columns(model))

        chunks = await self._start(caller, reply, messages)
        extra["parent_id"] = str(parent_id)
        if stream:
            return self._sse(chunks, reply, persist, include_usage=True, extra=extra)
        async for _ in chunks:  # the chunks fill in ``reply``
            pass
        self._check_finished(reply)
        await persist(reply)
        return completion_body(reply, extra)

    # --- generation -------------------------------------------------------------------------------------------
    async def _start(self, caller: Caller, reply: Reply, messages: list[dict]) -> AsyncIterator[Chunk]:
        """Start generating and wait for the first chunk, so that errors surface before any response is sent.

        The returned chunks fill in ``reply`` as they pass; when they end (or the consumer stops) the request is
        counted in the metrics and the caller's token budget.
        """
        await check_token_budget(self.redis, self.settings, caller)
        request = GenerationRequest(str(reply.message_id), messages, reply.sampling, reply.target.engine_name)
        chunks = self.engine.generate(request)
        try:
            first = await anext(chunks)
        except PromptTooLong as exc:
            raise ClientError(str(exc), field="messages") from exc
        except EngineOverloaded as exc:
            raise Unavailable(str(exc), extra={"retry_after": 1}) from exc
        except AdapterNotLoaded as exc:
            raise Unavailable(f"{exc}; retry shortly", extra={"retry_after": 1}) from exc

        async def counted() -> AsyncIterator[Chunk]:
            chunk = first
            try:
                while True:
                    reply.add(chunk)
                    yield chunk
                    if chunk.finish_reason:
                        return
                    chunk = await anext(chunks)
            finally:
                await chunks.aclose()
                self._account(caller, reply)

        return counted()

    def _account(self, caller: Caller, reply: Reply) -> None:
        label = reply.target.label
        m = self.metrics
        m.requests.labels(label, reply.finish_reason or "abort").inc()
        m.prompt_tokens.labels(label).inc(reply.prompt_tokens)
        m.completion_tokens.labels(label).inc(reply.completion_tokens)
        if reply.first_token_at is not None:
            m.ttft.labels(label).observe(reply.first_token_at - reply.started)
        m.latency.labels(label).observe(time.perf_counter() - reply.started)
        self._spawn(record_tokens(self.redis, caller, reply.completion_tokens))

    def _sse(self, chunks: AsyncIterator[Chunk], reply: Reply, persist: Callable[[Reply], Awaitable[None]],
             include_usage: bool, extra: dict | None = None) -> AsyncIterator[bytes]:
        async def events() -> AsyncIterator[bytes]:
            finished = False
            try:
                yield _event(chunk_body(reply, {"role": "assistant", "content": ""}, None, extra))
                async for chunk in chunks:
                    if chunk.text:
                        yield _event(chunk_body(reply, {"content": chunk.text}, None, extra))
                    if chunk.finish_reason == "abort":
                        yield _event({"error": {"message": "generation was interrupted by an engine error",
                                                "type": "engine_error", "code": 503}})
                    elif chunk.finish_reason:
                        yield _event(chunk_body(reply, {}, chunk.finish_reason, extra))
                if include_usage:
                    yield _event({**chunk_body(reply, None, None, extra), "choices": [], "usage": usage(reply)})
                finished = True
                await persist(reply)
                yield b"data: [DONE]\n\n"
            finally:
                if not finished:  # the client left: keep what was generated, marked aborted
                    reply.finish_reason = "abort"
                    self._spawn(persist(reply))

        return events()

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- validation ---------------------------------------------------------------------------------------------
    def _validate(self, messages: list[ChatMessage]) -> list[dict]:
        limits = self.settings.auth
        if not messages:
            raise ClientError("messages must hold at least one message", field="messages")
        if len(messages) > limits.max_messages:
            raise ClientError(f"at most {limits.max_messages} messages per request", field="messages")
        plain = []
        for i, m in enumerate(messages):
            self._check_length(m.text, f"messages[{i}].content")
            plain.append({"role": m.role, "content": m.text})
        self._validate_roles(plain)
        return plain

    def _validate_roles(self, messages: list[dict]) -> None:
        roles = [m["role"] for m in messages]
        for i, role in enumerate(roles):
            if role == "system" and any(r != "system" for r in roles[:i]):
                raise ClientError("a system message may only come first", field=f"messages[{i}].role")
        if roles[-1] != "user":
            raise ClientError("the last message must be from the user", field=f"messages[{len(roles) - 1}].role")

    def _check_length(self, text: str, name: str) -> None:
        if not text.strip():
            raise ClientError(f"{name} is empty", field=name)
        if len(text) > self.settings.auth.max_message_chars:
            raise ClientError(f"{name} is longer than {self.settings.auth.max_message_chars} characters", field=name)

    def _sampling(self, body: SamplingFields) -> SamplingParams:
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > self.settings.auth.max_tokens_limit:
            raise ClientError(f"max_tokens may be at most {self.settings.auth.max_tokens_limit}", field="max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4 or any(not s for s in stop):
            raise ClientError("stop takes up to 4 non-empty strings", field="stop")
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=stop,
                              seed=body.seed, frequency_penalty=body.frequency_penalty,
                              presence_penalty=body.presence_penalty, ignore_eos=body.ignore_eos)

    @staticmethod
    def _check_finished(reply: Reply) -> None:
        if reply.finish_reason == "abort":
            raise Unavailable("generation was interrupted by an engine error; retry", extra={"retry_after": 1})

    async def _visible_conversation(self, caller: Caller, conversation_id: uuid.UUID):
        row = await store.get_conversation(self.pool, conversation_id)
        # Someone else's conversation is "not found", not "forbidden": its existence is not for the caller to learn.
        if row is None or row["deleted_at"] is not None or not caller.may_see(row["owner"]):
            raise NotFound("no such conversation", field="conversation_id")
        return row


def _uuid(value: str, name: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ClientError(f"{name} is not a message id", field=name) from None


def _event(body: dict) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


def chunk_body(reply: Reply, delta: dict | None, finish_reason: str | None, extra: dict | None = None) -> dict:
    body = {"id": f"chatcmpl-{reply.message_id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": reply.target.label, "flywheel": reply.extra(**(extra or {}))}
    if delta is not None:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return body


def completion_body(reply: Reply, extra: dict | None = None) -> dict:
    return {"id": f"chatcmpl-{reply.message_id}", "object": "chat.completion", "created": int(time.time()),
            "model": reply.target.label,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason}],
            "usage": usage(reply), "flywheel": reply.extra(**(extra or {}))}
