"""Adapter folders on disk: what a PEFT LoRA adapter consists of and its checksum.

The checksum covers the adapter's config and weights (names, sizes and bytes), so a folder copied elsewhere keeps
its digest and any change to either file is caught. No torch here: the registry and the engines share it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_PREFIX = "base_model.model."


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


def lora_misfit(shapes: dict[str, list[int]], rank: int, rank_pattern: dict[str, int],
                linear: Callable[[str], tuple[int, int] | None]) -> str | None:
    """None if every tensor is a LoRA A/B of the right shape for a linear layer of the base, else what differs.

    ``linear(module)`` gives a base layer's (out_features, in_features), None when it has no such layer; the import
    check reads them from safetensors headers, the engine from the loaded model, so both refuse the same adapters.
    """
    if not shapes:
        return "it holds no tensors"
    for key, shape in shapes.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            return f"{key} is not a LoRA weight (modules_to_save and other extras are not served)"
        module = key.removeprefix(_PREFIX).split(".lora_")[0]
        layer = linear(module)
        if layer is None:
            return f"the base model has no linear layer {module}"
        out_features, in_features = layer
        # peft's rule: a rank_pattern key matches the module's full name or a dotted suffix of it
        r = next((v for k, v in rank_pattern.items() if re.fullmatch(rf"(.*\.)?{k}", module)), rank)
        if ".lora_A." in key and list(shape) != [r, in_features]:
            return (f"{key} has shape {list(shape)}; {module} takes {in_features} inputs at rank {r}, "
                    f"so it should be {[r, in_features]}")
        if ".lora_B." in key and list(shape) != [out_features, r]:
            return (f"{key} has shape {list(shape)}; {module} gives {out_features} outputs at rank {r}, "
                    f"so it should be {[out_features, r]}")
    return None
