"""Bodies of the runs API."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from worker.train import Algorithm


class NewRun(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    algorithm: Algorithm | None = None
    max_steps: Annotated[int, Meta(ge=1, le=100_000)] | None = None
    epochs: Annotated[float, Meta(gt=0, le=100)] | None = None
    learning_rate: Annotated[float, Meta(gt=0, lt=1)] | None = None

    def params(self) -> dict:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}
