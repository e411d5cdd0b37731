"""Engines that run the model; ``create_engine`` picks one from the settings (model libraries load lazily)."""

from __future__ import annotations

from service.engine.base import Engine
from service.settings import Settings, SettingsError


def create_engine(settings: Settings) -> Engine:
    e = settings.engine
    if e.engine == "local":
        from service.engine.local import LocalEngine

        return LocalEngine(settings.base_model, device=e.device, dtype=e.dtype, max_batch_size=e.max_batch_size,
                           max_loaded_adapters=e.max_loaded_adapters, max_tokens_default=e.max_tokens_default,
                           max_queued=e.max_queued)
    raise SettingsError("FLYWHEEL_ENGINE", f"the {e.engine} engine is not implemented yet; use local")
