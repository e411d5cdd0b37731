"""Importing a LoRA adapter trained elsewhere: check it against the base model, copy it in, register a candidate.

The check reads only JSON and safetensors headers (no torch, no model load), so the CLI and the API refuse a
mismatched adapter in milliseconds with a message naming what differs. Imported files are copied into the
adapter dir under the new version, so the registry never points at a folder someone may still change.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from functools import cache
from pathlib import Path

import asyncpg

from service.adapters import store
from service.adapters.files import ADAPTER_FILES, AdapterFilesError, adapter_digest, lora_misfit
from service.settings import Settings

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class AdapterImportError(AdapterFilesError):
    """The adapter does not fit the base model or is not one we can serve; ``field`` says which input is wrong."""

    def __init__(self, message: str, field: str = "adapter"):
        super().__init__(message)
        self.field = field


class NameTaken(AdapterImportError):
    """Another adapter has this name (a conflict, not bad input)."""


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (an 8-byte length, then JSON), without reading weights."""
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= 100 * 2**20:
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length))
        return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise AdapterImportError(f"{file.name} is not a readable safetensors file ({exc})", "adapter_model") from exc


@cache
def base_weight_shapes(base_model: str) -> dict[str, list[int]]:
    """Shapes of every weight of a local base model folder (single file or sharded)."""
    folder = Path(base_model)
    if not folder.is_dir():
        raise AdapterImportError(f"the base model {base_model!r} is not a local folder, so adapters cannot be checked "
                           "against it; set FLYWHEEL_BASE_MODEL to a folder", "base_model")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AdapterImportError(f"the base model folder {folder} has no .safetensors weights", "base_model")
    shapes: dict[str, list[int]] = {}
    for file in files:
        shapes.update(safetensors_shapes(file))
    return shapes


def check_against_base(folder: Path, base_model: str) -> dict:
    """The adapter's config if every LoRA tensor fits a linear layer of the base; else an error naming the misfit."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise AdapterImportError(f"adapter_config.json cannot be read: {exc}", "adapter_config") from exc
    if not isinstance(config, dict):
        raise AdapterImportError("adapter_config.json must hold a JSON object", "adapter_config")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterImportError(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters are served",
                           "adapter_config")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterImportError(f"task_type is {config['task_type']!r}; a chat model needs CAUSAL_LM",
                                 "adapter_config")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterImportError(f"r must be a positive integer, got {rank!r}", "adapter_config")
    base = base_weight_shapes(base_model)

    def linear(module: str) -> tuple[int, int] | None:
        weight = base.get(f"{module}.weight")
        return tuple(weight) if weight is not None and len(weight) == 2 else None

    problem = lora_misfit(safetensors_shapes(folder / "adapter_model.safetensors"), rank,
                          config.get("rank_pattern") or {}, linear)
    if problem:
        raise AdapterImportError(problem, "adapter_model")
    return config


def check_name(name: str) -> None:
    if not name or len(name) > 100 or not set(name) <= _NAME_CHARS or name == "base" or name.startswith("flywheel"):
        raise AdapterImportError(f"{name!r} is not a usable adapter name: use 1-100 letters, digits, '.', '_' or '-', "
                           "not 'base' or a name starting with 'flywheel'", "name")


async def import_adapter(conn: asyncpg.Connection, settings: Settings, source: Path, *, name: str, actor: str,
                         reason: str | None = None) -> asyncpg.Record:
    """Check ``source`` against the base, copy it to the adapter dir as the next version, register a candidate.

    The row and the folder appear together: the copy is renamed into place inside the transaction that inserts
    the row, so a failure leaves neither.
    """
    check_name(name)
    config = check_against_base(source, settings.base_model)
    sha256, size = adapter_digest(source)
    settings.adapter_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=settings.adapter_dir))
    try:
        try:
            for file in ADAPTER_FILES:
                shutil.copyfile(source / file, staging / file)
        except OSError as exc:  # a file error is about the adapter, not a lost connection
            raise AdapterFilesError(f"{source} cannot be copied: {exc}") from exc
        if adapter_digest(staging) != (sha256, size):
            raise AdapterFilesError(f"{source} changed while it was being copied; try again")
        async with conn.transaction():
            if await store.get_by_name(conn, name) is not None:
                raise NameTaken(f"an adapter named {name!r} exists already; choose another name", "name")
            row = await store.insert_candidate(
                conn, name=name, base_model=settings.base_model, path="", sha256=sha256, size_bytes=size,
                actor=actor, reason=reason or f"imported (trained on {config.get('base_model_name_or_path')})")
            final = settings.adapter_dir / str(row["version"])
            if final.exists():
                raise AdapterFilesError(f"{final} exists but is not this registry's: left by another database? "
                                        "Move it away and import again")
            row = await conn.fetchrow(f"UPDATE adapters SET path = $2 WHERE version = $1 RETURNING {store.COLUMNS}",
                                      row["version"], str(final))
            staging.rename(final)
        return row
    finally:
        shutil.rmtree(staging, ignore_errors=True)
