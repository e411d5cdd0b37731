"""HTTP for chat: the OpenAI-compatible /v1 surface and /api/conversations. Handlers parse, call, return."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Controller, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from service.auth import Caller, Role
from service.chat.schemas import (
    ChatCompletionRequest,
    LoadLoraAdapter,
    NewConversation,
    NewUserMessage,
    Regenerate,
    UnloadLoraAdapter,
)

Auth = NamedDependency[Caller]  # the caller behind the request's API key (service.auth.authenticate)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def respond(result: dict | AsyncIterator[bytes]) -> Response:
    if isinstance(result, dict):
        return Response(result, status_code=200)
    return Stream(result, media_type="text/event-stream", headers=SSE_HEADERS)


class OpenAIController(Controller):
    path = "/v1"

    @post("/chat/completions", status_code=200)
    async def chat_completions(self, data: JSONBody[ChatCompletionRequest], caller: Auth, state: State) -> Response:
        return respond(await state.chat.complete(caller, data))

    @get("/models")
    async def models(self, caller: Auth, state: State) -> dict[str, Any]:
        return {"object": "list", "data": await state.adapters.models()}

    @post("/load_lora_adapter", status_code=200)
    async def load_lora_adapter(self, data: JSONBody[LoadLoraAdapter], caller: Auth, state: State) -> dict[str, Any]:
        caller.require(Role.operator)
        row = await state.adapters.load_by_path(data.lora_name, data.lora_path, caller)
        return {"lora_name": data.lora_name, "model": f"flywheel:v{row['version']}", "version": row["version"],
                "status": row["status"]}

    @post("/unload_lora_adapter", status_code=200)
    async def unload_lora_adapter(self, data: JSONBody[UnloadLoraAdapter], caller: Auth,
                                  state: State) -> dict[str, Any]:
        caller.require(Role.operator)
        await state.adapters.unload_by_name(data.lora_name)
        return {"lora_name": data.lora_name, "unloaded": True}


class ConversationController(Controller):
    path = "/api"

    @post("/conversations")
    async def create(self, data: JSONBody[NewConversation], caller: Auth, state: State) -> dict[str, Any]:
        return await state.chat.create_conversation(caller, data.title, data.system)

    @get("/conversations")
    async def list(
        self, caller: Auth, state: State,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
        offset: Annotated[int, QueryParameter(ge=0)] = 0,
    ) -> dict[str, Any]:
        return {"data": await state.chat.list_conversations(caller, limit, offset)}

    @get("/conversations/{conversation_id:uuid}")
    async def get(self, conversation_id: FromPath[uuid.UUID], caller: Auth, state: State) -> dict[str, Any]:
        return await state.chat.get_conversation(caller, conversation_id)

    @delete("/conversations/{conversation_id:uuid}")
    async def delete(self, conversation_id: FromPath[uuid.UUID], caller: Auth, state: State) -> None:
        await state.chat.delete_conversation(caller, conversation_id)

    @post("/conversations/{conversation_id:uuid}/messages", status_code=200)
    async def post_message(self, conversation_id: FromPath[uuid.UUID], data: JSONBody[NewUserMessage], caller: Auth,
                           state: State) -> Response:
        return respond(await state.chat.post_message(caller, conversation_id, data.content, data.model,
                                                     data.parent_id, data, data.stream))

    @post("/messages/{message_id:uuid}/regenerate", status_code=200)
    async def regenerate(self, message_id: FromPath[uuid.UUID], data: JSONBody[Regenerate], caller: Auth,
                         state: State) -> Response:
        return respond(await state.chat.regenerate(caller, message_id, data.model, data, data.stream))
