"""Fixtures for tests that talk to a real `flywheel serve` process."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.service_process import service_on_fresh_database

ADMIN_KEY = "test-admin-key-" + uuid.uuid4().hex
RATE_LIMIT = 150


@pytest.fixture(scope="module")
def service(postgres_server_url, template_database, redis_url, model_dir, default_model, shared_tmp):
    with service_on_fresh_database(postgres_server_url, template_database, shared_tmp, FLYWHEEL_REDIS_URL=redis_url,
                                   FLYWHEEL_MODEL_DIR=str(model_dir), FLYWHEEL_ADMIN_KEY=ADMIN_KEY,
                                   FLYWHEEL_RATE_LIMIT_PER_MIN=str(RATE_LIMIT),
                                   FLYWHEEL_MAX_MESSAGE_CHARS="40000") as process:
        yield process
