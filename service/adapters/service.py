"""Which adapter answers a request, and keeping the engine's loaded adapters in line with the registry.

Model names a client may use (DESIGN.md): ``flywheel`` (production, or the canary for a stable share of callers),
``flywheel:canary``, ``flywheel:vN`` (pinned), an adapter's own name, and ``base``. A pinned version that is not
loaded yet is loaded on demand after its checksum is verified; an adapter whose files are missing or corrupt is
refused with a clear error while everything else keeps being served.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from service.adapters import store
from service.adapters.files import AdapterFilesError, adapter_digest
from service.auth import Caller, Role
from service.engine.base import BASE, AdapterLoadError, Engine
from service.errors import ClientError, Conflict, NotFound, Unavailable
from service.settings import Settings

log = logging.getLogger(__name__)
_PINNED = re.compile(r"^flywheel:v(\d+)$")
UNLOAD_GRACE_S = 2.0


@dataclass(frozen=True)
class Target:
    """Where a request goes: the engine's adapter name, the registry version (None: base), the name we report."""

    engine_name: str
    version: int | None
    label: str


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def engine_name(version: int) -> str:
    return f"v{version}"


def in_canary(caller: Caller, percent: int) -> bool:
    """A stable coin per caller: one user always sees the same version while the canary runs."""
    bucket = int(hashlib.sha256(f"flywheel-canary:{caller.key_hash}".encode()).hexdigest(), 16) % 100
    return bucket < percent


class AdapterService:
    def __init__(self, pool: asyncpg.Pool, engine: Engine, settings: Settings, redis=None, metrics=None):
        self.pool, self.engine, self.settings, self.redis, self.metrics = pool, engine, settings, redis, metrics
        # What `flywheel` means in this process: set by reconcile, so a promote flips it at once for new requests
        # while running ones finish on their version; a version that fails to load leaves the old one in place.
        self.aliases: dict[str, asyncpg.Record | None] = {"production": None, "canary": None}
        self.load_errors: dict[int, str] = {}
        self._unloading: set[asyncio.Task] = set()  # background unloads, referenced until done
        self._keep: set[str] = set()  # engine names the last reconcile needs loaded

    async def resolve(self, model: str, caller: Caller) -> Target:
        if model == BASE:
            return Target(BASE, None, BASE)
        if model in ("flywheel", "flywheel:canary"):
            canary, production = self.aliases["canary"], self.aliases["production"]
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
        started = time.perf_counter()
        try:
            await self.engine.load_adapter(name, row["path"], row["sha256"])
        except AdapterLoadError as exc:
            log.error("adapter v%s cannot be served: %s", row["version"], exc)
            if self.metrics:
                self.metrics.adapter_load_failures.inc()
            raise Unavailable(f"adapter v{row['version']} cannot be loaded: {exc}") from exc
        if self.metrics:
            self.metrics.adapter_load.observe(time.perf_counter() - started)

    async def reconcile(self) -> None:
        """Make this process serve what the registry says: load production and canary, then flip the aliases.

        An adapter that cannot be loaded is not served: the alias keeps its previous version, the failure is
        logged, kept for /ready and recorded once in the registry's events.
        """
        live = {row["status"]: row for row in await store.live(self.pool)}
        live_versions = {row["version"] for row in live.values()}
        self.load_errors = {v: e for v, e in self.load_errors.items() if v in live_versions}
        previous = await self.pool.fetchrow(
            """SELECT a.version FROM adapter_events e JOIN adapters a ON a.version = e.version
               WHERE e.to_status = 'retired' AND e.from_status = 'production' AND a.status = 'retired'
               ORDER BY e.id DESC LIMIT 1""")
        keep = {engine_name(r["version"]) for r in live.values()}
        served_before = {engine_name(r["version"]) for r in self.aliases.values() if r is not None}
        for alias in ("production", "canary"):
            row = live.get(alias)
            if row is None:
                self.aliases[alias] = None
                continue
            try:
                await self.ensure_loaded(row)
            except Unavailable as exc:
                await self._record_load_failure(row, str(exc))
                continue
            self.load_errors.pop(row["version"], None)
            self.aliases[alias] = row
        keep |= {engine_name(r["version"]) for r in self.aliases.values() if r is not None}
        if previous is not None:
            keep.add(engine_name(previous["version"]))  # the rollback target stays warm
        self.engine.pin(keep)
        self._keep = keep
        # A version this process served that is neither live nor the rollback target is unloaded once its requests
        # end; versions loaded on demand for pinned requests stay until the LRU cap evicts them.
        for name in served_before - keep:
            task = asyncio.create_task(self._unload_unless_needed(name))
            self._unloading.add(task)
            task.add_done_callback(self._unloading.discard)

    async def _unload_unless_needed(self, name: str) -> None:
        """After a grace period (requests resolved just before the flip reach the engine, whose unload then waits
        for them), unless a later reconcile made the version needed again."""
        await asyncio.sleep(UNLOAD_GRACE_S)
        if name not in self._keep:
            await self.engine.unload_adapter(name)

    async def _record_load_failure(self, row, error: str) -> None:
        if self.load_errors.get(row["version"]) == error:
            return
        self.load_errors[row["version"]] = error
        await self.pool.execute(
            "INSERT INTO adapter_events (version, from_status, to_status, actor, reason) VALUES ($1, $2, $2, $3, $4)",
            row["version"], row["status"], f"service {worker_id()}", f"load failed: {error}")

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
        production, canary = self.aliases["production"], self.aliases["canary"]
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

    # --- operators -------------------------------------------------------------------------------------------
    async def operate(self, caller: Caller, operation: str, version: int | None = None, **options) -> dict:
        """Run a registry operation (promote, canary, reject, retire, rollback), then tell every process."""
        from service.adapters import registry
        from service.adapters.events import publish

        caller.require(Role.operator)
        async with self.pool.acquire() as conn, conn.transaction():
            row = await registry.run_operation(conn, operation, version, actor=caller.name, **options)
        if self.redis is not None:
            await publish(self.redis, {"operation": operation, "version": row["version"] if row else None})
        await self.reconcile()  # this process switches before answering
        return {"operation": operation, "adapter": dict(row) if row else None,
                "serving": {a: r["version"] if r else None for a, r in self.aliases.items()}}

    async def import_folder(self, caller: Caller, folder: Path, *, name: str, reason: str | None) -> dict:
        """Register an adapter trained elsewhere as a candidate (checked against the base, copied, checksummed)."""
        from service.adapters.imports import AdapterImportError, NameTaken, import_adapter

        caller.require(Role.operator)
        try:
            async with self.pool.acquire() as conn:
                row = await import_adapter(conn, self.settings, folder, name=name, actor=caller.name, reason=reason)
        except AdapterImportError as exc:
            raise (Conflict if isinstance(exc, NameTaken) else ClientError)(str(exc), field=exc.field) from exc
        except AdapterFilesError as exc:
            raise ClientError(str(exc), field="adapter") from exc
        return dict(row)

    async def describe(self, caller: Caller, version: int) -> dict:
        caller.require(Role.operator)
        row = await store.get(self.pool, version)
        if row is None:
            raise NotFound(f"no adapter version {version}", field="version")
        events = await self.pool.fetch("SELECT from_status, to_status, actor, reason, at FROM adapter_events "
                                       "WHERE version = $1 ORDER BY id", version)
        return {**dict(row), "events": [dict(e) for e in events], "load_error": self.load_errors.get(version)}

    async def listing(self, caller: Caller, status: str | None) -> list[dict]:
        caller.require(Role.operator)
        rows = await self.pool.fetch(f"SELECT {store.COLUMNS} FROM adapters WHERE $1::text IS NULL OR status = $1 "
                                     "ORDER BY version DESC", status)
        return [dict(r) for r in rows]
