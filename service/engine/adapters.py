"""Reading a LoRA adapter for the local engine: verify its checksum, read its weights, check it fits the base.

Everything here runs before the model is touched, so a missing, corrupt or mismatched adapter is refused while
whatever is being served keeps running.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from service.adapters.files import AdapterFilesError, adapter_digest, lora_misfit
from service.engine.base import AdapterLoadError


def read_adapter_files(path: str, sha256: str | None):
    """(weights, LoraConfig) of the adapter at ``path``; AdapterLoadError if anything is wrong with the files."""
    from peft import LoraConfig

    try:
        actual, _ = adapter_digest(path)
    except AdapterFilesError as exc:
        raise AdapterLoadError(str(exc)) from exc
    if sha256 is not None and actual != sha256:
        raise AdapterLoadError(f"adapter at {path} fails its checksum (sha256 {actual[:12]}…, registered "
                               f"{sha256[:12]}…): the files changed or are corrupt")
    try:
        raw = json.loads((Path(path) / "adapter_config.json").read_text())
        if raw.get("peft_type", "LORA") != "LORA":
            raise AdapterLoadError(f"adapter at {path} is {raw.get('peft_type')}, only LoRA adapters are served")
        known = set(LoraConfig.__dataclass_fields__)
        config = LoraConfig(**{k: v for k, v in raw.items() if k in known})
        weights = load_file(str(Path(path) / "adapter_model.safetensors"))
    except (ValueError, TypeError, SafetensorError, OSError) as exc:
        raise AdapterLoadError(f"adapter at {path} cannot be read: {exc}") from exc
    return weights, config


def adapter_fits(base: torch.nn.Module, weights: dict[str, torch.Tensor], config) -> str | None:
    """None if every LoRA tensor has a linear layer of the right shape in ``base``, else what differs."""
    def linear(module: str) -> tuple[int, int] | None:
        try:
            layer = base.get_submodule(module)
        except AttributeError:
            return None
        return (layer.out_features, layer.in_features) if hasattr(layer, "in_features") else None

    shapes = {key: list(tensor.shape) for key, tensor in weights.items()}
    return lora_misfit(shapes, config.r, config.rank_pattern or {}, linear)
