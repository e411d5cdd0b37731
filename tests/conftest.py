"""Shared fixtures: real PostgreSQL, real Redis, the real default model.

PostgreSQL and Redis are the ones at FLYWHEEL_TEST_DATABASE_URL / FLYWHEEL_TEST_REDIS_URL, else at the usual
local ports, else embedded ones started for the session: real servers in every case, never fakes. Each test that
needs a database gets its own, cloned from a migrated template, and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from service import db
from service.embedded import EmbeddedPostgres, EmbeddedRedis, postgres_answers, redis_answers
from service.settings import DEFAULT_MODEL_NAME

# Child processes and libraries must never reach a hub or phone home from the tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TEST_DATABASE_URL = os.environ.get("FLYWHEEL_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_REDIS_URL = os.environ.get("FLYWHEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@pytest.fixture(scope="session")
def shared_tmp():
    """A temporary folder others can enter: the embedded PostgreSQL runs as its own user when we are root."""
    folder = Path(tempfile.mkdtemp(prefix="flywheel-test-"))
    folder.chmod(folder.stat().st_mode | stat.S_IXOTH | stat.S_IROTH)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url(shared_tmp):
    """URL of a PostgreSQL server (its `postgres` database) for the whole session."""
    if asyncio.run(postgres_answers(TEST_DATABASE_URL)):
        yield TEST_DATABASE_URL
        return
    server = EmbeddedPostgres(shared_tmp / "session-postgres")
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def redis_url(shared_tmp):
    if asyncio.run(redis_answers(TEST_REDIS_URL)):
        yield TEST_REDIS_URL
        return
    server = EmbeddedRedis(shared_tmp / "session-redis")
    yield server.start()
    server.stop()


async def _admin(server_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_database(postgres_server_url):
    """A database migrated once per session; test databases are cloned from it (fast)."""
    name = f"flywheel_template_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(postgres_server_url, f'CREATE DATABASE "{name}"'))

    async def migrate():
        conn = await asyncpg.connect(with_database(postgres_server_url, name))
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    asyncio.run(migrate())
    yield name
    asyncio.run(_admin(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _fresh_database(server_url: str, template: str | None):
    name = f"flywheel_test_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"{clause}'))
    return name


@pytest.fixture
def database_url(postgres_server_url, template_database):
    """A migrated database of this test's own."""
    name = _fresh_database(postgres_server_url, template_database)
    yield with_database(postgres_server_url, name)
    asyncio.run(_admin(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_database_url(postgres_server_url):
    """An empty database (no schema) of this test's own."""
    name = _fresh_database(postgres_server_url, None)
    yield with_database(postgres_server_url, name)
    asyncio.run(_admin(postgres_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """Where converted models are cached between runs (FLYWHEEL_MODEL_DIR or the default)."""
    return Path(os.environ.get("FLYWHEEL_MODEL_DIR", "~/.cache/flywheel/models")).expanduser().resolve()


@pytest.fixture(scope="session")
def default_model(model_dir) -> Path:
    """The default model, provisioned by the product's own code (a cheap verification once cached)."""
    from service.engine.weights import fetch_default_model

    target = model_dir / DEFAULT_MODEL_NAME
    fetch_default_model(target)
    return target


@pytest.fixture
def test_env(database_url, redis_url, model_dir, shared_tmp) -> dict[str, str]:
    """Environment for a Flywheel child process pointed at this test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_DATABASE_URL=database_url, FLYWHEEL_REDIS_URL=redis_url,
               FLYWHEEL_MODEL_DIR=str(model_dir), FLYWHEEL_DATA_DIR=str(shared_tmp / uuid.uuid4().hex[:8]))
    return env


def checksummed_files(folder: Path) -> tuple[str, str, int]:
    """(path, sha256, size) of a folder the registry's file check accepts; for tests that never load weights."""
    from service.adapters.files import ADAPTER_FILES, adapter_digest

    folder.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        (folder / name).write_bytes(name.encode())
    return (str(folder), *adapter_digest(folder))


def make_lora_adapter(base_model: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights: it changes the model's answers, as a trained one would."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_adapters(default_model, shared_tmp) -> list[Path]:
    """Two different adapters for the default model."""
    return [make_lora_adapter(default_model, shared_tmp / f"adapter-{i}", seed=i) for i in range(2)]
