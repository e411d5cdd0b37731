"""HTTP for feedback, key flags, stats and export. Handlers parse, call, return."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Response, delete, get, post, put
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter
from litestar.response import Stream

from service.auth import Caller, Role
from service.errors import ClientError, NotFound
from service.feedback.export import FORMATS, ExportFilter, Format, counts, export_rows
from service.feedback.schemas import Feedback, FlagKey, Kind
from service.feedback.stats import adapter_stats

Auth = NamedDependency[Caller]


def parse_adapter(value: str, field: str) -> int | None:
    """'base' -> None, '7' or 'v7' or 'flywheel:v7' -> 7."""
    if value == "base":
        return None
    match = re.fullmatch(r"(?:flywheel:)?v?(\d+)", value)
    if not match:
        raise ClientError(f"{value!r} is not an adapter version (use base, 7, v7 or flywheel:v7)", field=field)
    return int(match.group(1))


class FeedbackController(Controller):
    path = "/api"

    @put("/messages/{message_id:uuid}/feedback")
    async def put_feedback(self, message_id: FromPath[uuid.UUID], data: JSONBody[Feedback], caller: Auth,
                           state: State) -> Response:
        feedback, created = await state.feedback.put(caller, message_id, data)
        return Response({"feedback": feedback, "created": created}, status_code=201 if created else 200)

    @get("/messages/{message_id:uuid}/feedback")
    async def get_feedback(self, message_id: FromPath[uuid.UUID], caller: Auth, state: State) -> dict[str, Any]:
        return {"data": await state.feedback.get(caller, message_id)}

    @delete("/messages/{message_id:uuid}/feedback")
    async def retract_feedback(self, message_id: FromPath[uuid.UUID], caller: Auth, state: State,
                               kind: Annotated[Kind | None, QueryParameter()] = None) -> None:
        await state.feedback.retract(caller, message_id, kind)

    @post("/admin/keys/{key_id:int}/flag", status_code=200)
    async def flag_key(self, key_id: FromPath[int], caller: Auth, state: State,
                       data: JSONBody[FlagKey | None] = None) -> dict[str, Any]:
        await state.feedback.flag_key(caller, key_id, data.reason if data else None, flagged=True)
        return {"key_id": key_id, "flagged": True}

    @delete("/admin/keys/{key_id:int}/flag")
    async def unflag_key(self, key_id: FromPath[int], caller: Auth, state: State) -> None:
        await state.feedback.flag_key(caller, key_id, None, flagged=False)

    @get("/stats")
    async def stats(self, caller: Auth, state: State,
                    since: Annotated[datetime | None, QueryParameter()] = None,
                    until: Annotated[datetime | None, QueryParameter()] = None) -> dict[str, Any]:
        caller.require(Role.operator)
        return {"since": since, "until": until, "adapters": await adapter_stats(state.pool, since, until)}

    @get("/adapters/{version:str}/stats")
    async def version_stats(self, version: FromPath[str], caller: Auth, state: State,
                            since: Annotated[datetime | None, QueryParameter()] = None,
                            until: Annotated[datetime | None, QueryParameter()] = None) -> dict[str, Any]:
        caller.require(Role.operator)
        number = parse_adapter(version, "version")
        if number is not None and not await state.pool.fetchval("SELECT 1 FROM adapters WHERE version = $1", number):
            raise NotFound(f"no adapter version {number}", field="version")
        found = await adapter_stats(state.pool, since, until, number, only_version=True)
        empty = {"version": number, "model": "base" if number is None else f"flywheel:v{number}", "totals": None,
                 "by_day": []}
        return found[0] if found else empty

    @get("/export")
    async def export(self, caller: Auth, state: State,
                     format: Annotated[str, QueryParameter()],  # noqa: A002 - the documented parameter name
                     since: Annotated[datetime | None, QueryParameter()] = None,
                     until: Annotated[datetime | None, QueryParameter()] = None,
                     adapter: Annotated[str | None, QueryParameter()] = None) -> Response:
        caller.require(Role.operator)
        if format not in FORMATS:
            raise ClientError(f"format must be one of {', '.join(FORMATS)}", field="format")
        version = parse_adapter(adapter, "adapter") if adapter else None
        where = ExportFilter(since, until, "base" if adapter == "base" else version)
        fmt: Format = format  # type: ignore[assignment]
        rows = await export_rows(state.pool, fmt, where)
        lines = (json.dumps(r.data, ensure_ascii=False).encode() + b"\n" for r in rows)
        headers = {"X-Flywheel-Rows": str(len(rows)), "X-Flywheel-Counts": json.dumps(counts(rows)),
                   "Content-Disposition": f'attachment; filename="flywheel-{fmt}.jsonl"'}
        return Stream(lines, media_type="application/x-ndjson", headers=headers)
