"""HTTP for operators: list and inspect adapters, canary, promote, reject, retire, roll back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from litestar import Controller, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from service.adapters.schemas import Change, StartCanary
from service.auth import Caller

Auth = NamedDependency[Caller]
Status = Literal["training", "candidate", "rejected", "failed", "canary", "production", "retired", "rolled_back"]


class AdapterController(Controller):
    path = "/api/adapters"

    @get("/")
    async def list_adapters(self, caller: Auth, state: State,
                            status: Annotated[Status | None, QueryParameter()] = None) -> dict[str, Any]:
        return {"data": await state.adapters.listing(caller, status)}

    @get("/{version:int}")
    async def show(self, version: FromPath[int], caller: Auth, state: State) -> dict[str, Any]:
        return await state.adapters.describe(caller, version)

    @post("/{version:int}/canary", status_code=200)
    async def canary(self, version: FromPath[int], data: JSONBody[StartCanary], caller: Auth,
                     state: State) -> dict[str, Any]:
        return await state.adapters.operate(caller, "canary", version, percent=data.percent, reason=data.reason)

    @post("/{version:int}/{operation:str}", status_code=200)
    async def change(self, version: FromPath[int], operation: FromPath[str], caller: Auth, state: State,
                     data: JSONBody[Change | None] = None) -> dict[str, Any]:
        from service.errors import NotFound

        if operation not in ("promote", "reject", "retire"):
            raise NotFound(f"no operation {operation!r} (promote, reject, retire, canary)", field="operation")
        return await state.adapters.operate(caller, operation, version, reason=data.reason if data else None)

    @post("/rollback", status_code=200)
    async def rollback(self, caller: Auth, state: State, data: JSONBody[Change | None] = None) -> dict[str, Any]:
        return await state.adapters.operate(caller, "rollback", reason=data.reason if data else None)
