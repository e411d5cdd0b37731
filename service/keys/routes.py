"""HTTP about the caller's own API key: who the key belongs to and what it may do.

Clients (the UI) ask this after sign-in to know which parts to show. Managing keys stays with the CLI
(`flywheel keys`) and flagging with /api/admin/keys; this module never shows a key or its hash.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, get
from litestar.di import NamedDependency

from service.auth import Caller

Auth = NamedDependency[Caller]


class KeyController(Controller):
    path = "/api"

    @get("/me", sync_to_thread=False)
    def me(self, caller: Auth) -> dict[str, Any]:
        return {"key_id": caller.key_id, "name": caller.name, "role": caller.role.name}
