"""Fixtures for tests that talk to a real `flywheel serve` process."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.conftest import _admin, _fresh_database, with_database
from tests.integration.service_process import ServiceProcess, child_env

ADMIN_KEY = "test-admin-key-" + uuid.uuid4().hex
RATE_LIMIT = 150


@pytest.fixture(scope="module")
def service(postgres_server_url, template_database, redis_url, model_dir, default_model, shared_tmp):
    name = _fresh_database(postgres_server_url, template_database)
    database_url = with_database(postgres_server_url, name)
    env = child_env(FLYWHEEL_DATABASE_URL=database_url, FLYWHEEL_REDIS_URL=redis_url,
                    FLYWHEEL_MODEL_DIR=str(model_dir), FLYWHEEL_DATA_DIR=str(shared_tmp / name),
                    FLYWHEEL_ADMIN_KEY=ADMIN_KEY, FLYWHEEL_RATE_LIMIT_PER_MIN=str(RATE_LIMIT),
                    FLYWHEEL_MAX_MESSAGE_CHARS="40000")
    process = ServiceProcess(env, shared_tmp / f"{name}.log").start()
    process.database_url = database_url
    yield process
    process.stop()
    asyncio.run(_admin(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
