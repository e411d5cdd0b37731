"""Bodies of the operators' adapter API."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

Reason = Annotated[str, Meta(max_length=500)]


class Change(msgspec.Struct, forbid_unknown_fields=True):
    reason: Reason | None = None


class StartCanary(msgspec.Struct, forbid_unknown_fields=True):
    percent: Annotated[int, Meta(ge=1, le=50)]
    reason: Reason | None = None
