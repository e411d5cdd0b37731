"""Which adapter answers a request, and keeping the engine's loaded adapters in line with the registry.

Model names a client may use (DESIGN.md): ``flywheel`` (production, or the canary for a stable share of callers),
``flywheel:canary``, ``flywheel:vN`` (pinned), an adapter's own name, and ``base``. A pinned version that is not
loaded yet is loaded on demand after its checksum is verified; an adapter whose files are missing or corrupt is
refused with a clear error while everything else keeps being served.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from service.adapters import store
from service.adapters.files import AdapterFilesError, adapter_digest
from service.auth import Caller
from service.engine.base import BASE, AdapterLoadError, Engine
from service.errors import ClientError, Conflict, NotFound, Unavailable
from service.settings import Settings

log = logging.getLogger(__name__)
_PINNED = re.compile(r"^flywheel:v(\d+)$")


@dataclass(frozen=True)
class Target:
    """Where a request goes: the engine's adapter name, the registry version (None: base), the name we report."""

    engine_name: str
    version: int | None
    label: str


def engine_name(version: int) -> str:
    return f"v{version}"


def in_canary(caller: Caller, percent: int) -> bool:
    """A stable coin per caller: one user always sees the same version while the canary runs."""
    bucket = int(hashlib.sha256(f"flywheel-canary:{caller.key_hash}".encode()).hexdigest(), 16) % 100
    return bucket < percent


class AdapterService:
    def __init__(self, pool: asyncpg.Pool, engine: Engine, settings: Settings):
        self.pool, self.engine, self.settings = pool, engine, settings

    async def resolve(self, model: str, caller: Caller) -> Target:
        if model == BASE:
            return Target(BASE, None, BASE)
        if model in ("flywheel", "flywheel:canary"):
            live = {row["status"]: row for row in await store.live(self.pool)}
            canary, production = live.get("canary"), live.get("production")
            if model == "flywheel:canary":
                if canary is None:
                    raise NotFound("no adapter is in canary now", field="model")
                row = canary
            elif canary is not None and in_canary(caller, canary["canary_percent"]):
                row = canary
            else:
                row = production
            if row is None:
                return Target(BASE, None, BASE)
        else:
            pinned = _PINNED.match(model)
            row = await (store.get(self.pool, int(pinned.group(1))) if pinned else store.get_by_name(self.pool, model))
            if row is None:
                raise NotFound(f"unknown model {model!r}; GET /v1/models lists the models you can use", field="model")
            if row["status"] not in store.SERVABLE:
                raise Conflict(f"adapter v{row['version']} is {row['status']} and cannot be served", field="model")
        await self.ensure_loaded(row)
        return Target(engine_name(row["version"]), row["version"], f"flywheel:v{row['version']}")

    async def ensure_loaded(self, row) -> None:
        name = engine_name(row["version"])
        if name in self.engine.loaded():
            return
        try:
            await self.engine.load_adapter(name, row["path"], row["sha256"])
        except AdapterLoadError as exc:
            log.error("adapter v%s cannot be served: %s", row["version"], exc)
            raise Unavailable(f"adapter v{row['version']} cannot be loaded: {exc}") from exc

    async def reconcile(self) -> None:
        """Load and pin production and canary; an unloadable one is logged and skipped (the rest still serve)."""
        live = await store.live(self.pool)
        self.engine.pin({engine_name(row["version"]) for row in live})
        for row in live:
            with contextlib.suppress(Unavailable):
                await self.ensure_loaded(row)

    async def load_by_path(self, name: str, path: str, caller: Caller):
        """`POST /v1/load_lora_adapter`: register the folder as a candidate (once) and load it."""
        if name == BASE or name.startswith("flywheel"):
            raise ClientError(f"{name!r} is reserved; choose another lora_name", field="lora_name")
        folder = Path(path)
        if not folder.is_absolute():
            raise ClientError("lora_path must be an absolute path on the server", field="lora_path")
        try:
            sha256, size = adapter_digest(folder)
        except AdapterFilesError as exc:
            raise ClientError(str(exc), field="lora_path") from exc
        row = await store.get_by_name(self.pool, name)
        try:
            if row is None:
                # Registered only if it loads: a corrupt or mismatched folder leaves no trace in the registry.
                async with self.pool.acquire() as conn, conn.transaction():
                    row = await store.insert_candidate(conn, name=name, base_model=self.settings.base_model,
                                                       path=str(folder), sha256=sha256, size_bytes=size,
                                                       actor=caller.name, reason="POST /v1/load_lora_adapter")
                    await self.engine.load_adapter(engine_name(row["version"]), str(folder), sha256)
                return row
            if row["sha256"] != sha256:
                raise Conflict(f"an adapter named {name!r} with other files is registered as v{row['version']}",
                               field="lora_name")
            await self.engine.load_adapter(engine_name(row["version"]), row["path"], row["sha256"])
        except AdapterLoadError as exc:
            raise ClientError(str(exc), field="lora_path") from exc
        except asyncpg.UniqueViolationError as exc:
            raise Conflict(f"an adapter named {name!r} is being registered by another request; retry",
                           field="lora_name") from exc
        return row

    async def unload_by_name(self, name: str) -> None:
        row = await store.get_by_name(self.pool, name)
        if row is None and (pinned := _PINNED.match(name)):
            row = await store.get(self.pool, int(pinned.group(1)))
        if row is None:
            raise NotFound(f"no adapter named {name!r}", field="lora_name")
        if row["status"] in ("production", "canary"):
            raise Conflict(f"v{row['version']} is {row['status']}; roll it back or retire it first",
                           field="lora_name")
        await self.engine.unload_adapter(engine_name(row["version"]))

    async def models(self) -> list[dict]:
        """OpenAI's model list: base, the aliases, and every loaded version with its parent."""
        live = {row["status"]: row for row in await store.live(self.pool)}
        production, canary = live.get("production"), live.get("canary")
        entries = [{"id": BASE, "parent": None},
                   {"id": "flywheel", "parent": f"flywheel:v{production['version']}" if production else BASE}]
        if canary:
            entries.append({"id": "flywheel:canary", "parent": f"flywheel:v{canary['version']}"})
        loaded = sorted(int(n[1:]) for n in self.engine.loaded() if n.startswith("v") and n[1:].isdigit())
        rows = await self.pool.fetch("SELECT version, name, parent_version, status FROM adapters "
                                     "WHERE version = ANY($1::int[]) ORDER BY version", loaded)
        for row in rows:
            parent = f"flywheel:v{row['parent_version']}" if row["parent_version"] else BASE
            entries.append({"id": f"flywheel:v{row['version']}", "parent": parent, "name": row["name"],
                            "status": row["status"]})
        return [{"object": "model", "owned_by": "flywheel", "root": self.settings.base_model, **e} for e in entries]
