"""HTTP for training runs: list, inspect, and queue one by hand (operators). The worker does the running."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from service.auth import Caller, Role
from service.errors import NotFound
from service.runs import store
from service.runs.schemas import NewRun

Auth = NamedDependency[Caller]


class RunController(Controller):
    path = "/api/runs"

    @get("/")
    async def list_runs(self, caller: Auth, state: State,
                        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50) -> dict[str, Any]:
        caller.require(Role.operator)
        return {"data": [dict(r) for r in await store.recent(state.pool, limit)]}

    @get("/{run_id:int}")
    async def get_run(self, run_id: FromPath[int], caller: Auth, state: State) -> dict[str, Any]:
        caller.require(Role.operator)
        row = await store.get(state.pool, run_id)
        if row is None:
            raise NotFound(f"no training run {run_id}", field="run_id")
        return dict(row)

    @post("/")
    async def queue_run(self, caller: Auth, state: State, data: JSONBody[NewRun | None] = None) -> dict[str, Any]:
        caller.require(Role.operator)
        params = data.params() if data else {}
        algorithm = params.get("algorithm", state.settings.training.train_algorithm)
        return dict(await store.queue(state.pool, algorithm=algorithm, params=params, requested_by=caller.name))
