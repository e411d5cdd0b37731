"""The UI's API client when the service is not there: one sentence that says so, no traceback, no key."""

from __future__ import annotations

import pytest

from service.embedded import free_port
from ui.client import ApiError, FlywheelClient


async def test_a_service_that_is_down_is_named_as_such():
    client = FlywheelClient(f"http://127.0.0.1:{free_port()}", "fw-secret-key")  # nothing listens there
    with pytest.raises(ApiError) as down:
        await client.me()
    assert "does not answer" in str(down.value) and "Is the service running?" in str(down.value)
    assert "fw-secret" not in str(down.value) and down.value.status == 0
    with pytest.raises(ApiError, match="does not answer"):
        async for _ in client.send("00000000-0000-0000-0000-000000000000", "hi", None):
            pass
