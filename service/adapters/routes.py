"""HTTP for operators: list, inspect and import adapters; canary, promote, reject, retire, roll back."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from litestar import Controller, Request, get, post
from litestar.datastructures import State, UploadFile
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from service.adapters.files import ADAPTER_FILES
from service.adapters.schemas import Change, StartCanary
from service.auth import Caller, Role
from service.errors import ClientError, NotFound

Auth = NamedDependency[Caller]
Status = Literal["training", "candidate", "rejected", "failed", "canary", "production", "retired", "rolled_back"]


class AdapterController(Controller):
    path = "/api/adapters"

    @get("/")
    async def list_adapters(self, caller: Auth, state: State,
                            status: Annotated[Status | None, QueryParameter()] = None) -> dict[str, Any]:
        return {"data": await state.adapters.listing(caller, status)}

    @post("/", status_code=201, request_max_body_size=2**31)
    async def import_adapter(self, request: Request, caller: Auth, state: State) -> dict[str, Any]:
        """Multipart upload of a PEFT adapter: files ``adapter_config`` and ``adapter_model``, fields ``name`` and
        ``reason``. It becomes a candidate; promote or canary it like a trained one."""
        caller.require(Role.operator)  # before reading an upload
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ClientError("send multipart/form-data with files adapter_config and adapter_model", field="body")
        form = await request.form()
        with tempfile.TemporaryDirectory(prefix="flywheel-upload-") as folder:
            for field, filename in zip(("adapter_config", "adapter_model"), ADAPTER_FILES, strict=True):
                upload = form.get(field)
                if not isinstance(upload, UploadFile):
                    raise ClientError(f"the file {field} ({filename}) is missing", field=field)
                Path(folder, filename).write_bytes(await upload.read())
            name = form.get("name")
            if not isinstance(name, str) or not name:
                raise ClientError("name is required: the adapter's name in the registry", field="name")
            reason = form.get("reason") if isinstance(form.get("reason"), str) else None
            return await state.adapters.import_folder(caller, Path(folder), name=name, reason=reason)

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
        if operation not in ("promote", "reject", "retire"):
            raise NotFound(f"no operation {operation!r} (promote, reject, retire, canary)", field="operation")
        return await state.adapters.operate(caller, operation, version, reason=data.reason if data else None)

    @post("/rollback", status_code=200)
    async def rollback(self, caller: Auth, state: State, data: JSONBody[Change | None] = None) -> dict[str, Any]:
        return await state.adapters.operate(caller, "rollback", reason=data.reason if data else None)
