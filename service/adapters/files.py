"""Adapter folders on disk: what a PEFT LoRA adapter consists of and its checksum.

The checksum covers the adapter's config and weights (names, sizes and bytes), so a folder copied elsewhere keeps
its digest and any change to either file is caught. No torch here: the registry and the engines share it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterFilesError(ValueError):
    pass


def adapter_digest(path: str | Path) -> tuple[str, int]:
    """(sha256, total size in bytes) of the adapter folder at ``path``."""
    folder = Path(path)
    digest, size = hashlib.sha256(), 0
    for name in ADAPTER_FILES:
        file = folder / name
        if not file.is_file():
            raise AdapterFilesError(f"{folder} has no {name}: not a PEFT adapter folder (or it was removed)")
        digest.update(f"{name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
        size += file.stat().st_size
    return digest.hexdigest(), size
