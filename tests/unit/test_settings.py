from pathlib import Path

import pytest

from service.settings import DEFAULT_DATABASE_URL, DEFAULT_MODEL_NAME, Settings, SettingsError, env_name


def test_defaults_need_no_environment():
    s = Settings.from_env({})
    assert s.engine.engine == "local"
    assert s.database_url == DEFAULT_DATABASE_URL
    assert s.db.database_url is None  # unset, so `flywheel up` may embed
    assert s.base_model == str(s.model_dir / DEFAULT_MODEL_NAME)
    assert s.adapter_dir == s.data_dir / "adapters"
    assert s.api_url == "http://127.0.0.1:8000"


def test_values_are_parsed_into_their_types():
    s = Settings.from_env({
        "FLYWHEEL_PORT": "9000", "FLYWHEEL_AUTO_MIGRATE": "false", "FLYWHEEL_HELDOUT_FRACTION": "0.25",
        "FLYWHEEL_ENGINE": "remote", "FLYWHEEL_ENGINE_URL": "http://vllm:8000", "FLYWHEEL_DATA_DIR": "/srv/fw",
        "FLYWHEEL_BASE_MODEL": "/models/qwen", "OTHER_VARIABLE": "ignored",
    })
    assert s.server.port == 9000 and s.db.auto_migrate is False and s.training.heldout_fraction == 0.25
    assert s.engine.engine_url == "http://vllm:8000"
    assert s.data_dir == Path("/srv/fw") and s.adapter_dir == Path("/srv/fw/adapters")
    assert s.base_model == "/models/qwen"


def test_empty_optional_value_means_unset():
    assert Settings.from_env({"FLYWHEEL_DATABASE_URL": ""}).db.database_url is None


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("FLYWHEEL_PORT", "abc", "expected int"),
        ("FLYWHEEL_PORT", "70000", "expected int <= 65535"),
        ("FLYWHEEL_ENGINE", "gpu", "must be one of local, vllm, remote"),
        ("FLYWHEEL_AUTO_MIGRATE", "maybe", "expected bool"),
        ("FLYWHEEL_CANARY_PERCENT", "90", "expected int <= 50"),
        ("FLYWHEEL_HELDOUT_FRACTION", "1.5", "expected float < 1.0"),
        ("FLYWHEEL_TRAIN_POLL_S", "0", "expected float > 0"),
        ("FLYWHEEL_DATABASE_URL", "mysql://localhost/x", "must be a URL starting with postgres://"),
        ("FLYWHEEL_REDIS_URL", "localhost:6379", "must be a URL starting with redis://"),
        ("FLYWHEEL_PORTT", "1", "unknown setting"),
    ],
)
def test_bad_value_names_the_variable_in_one_line(variable, value, expected):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert expected in message
    assert "\n" not in message


def test_remote_engine_requires_its_url():
    with pytest.raises(SettingsError, match="^FLYWHEEL_ENGINE_URL: required when FLYWHEEL_ENGINE=remote"):
        Settings.from_env({"FLYWHEEL_ENGINE": "remote"})


def test_secrets_are_masked_in_description_and_errors():
    s = Settings.from_env({"FLYWHEEL_DATABASE_URL": "postgresql://app:hunter2@db:5432/fw",
                           "FLYWHEEL_ADMIN_KEY": "a-very-secret-admin-key"})
    shown = {name: value for name, value, _ in s.describe()}
    assert shown["FLYWHEEL_DATABASE_URL"] == "postgresql://app:***@db:5432/fw"
    assert shown["FLYWHEEL_ADMIN_KEY"] == "***"
    assert "hunter2" not in str(shown) and "a-very-secret" not in str(shown)
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"FLYWHEEL_ADMIN_KEY": "short-secret"})
    assert "short-secret" not in str(caught.value)


def test_every_setting_is_documented_and_named_uniquely():
    rows = Settings.from_env({}).describe()
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)) > 20
    undocumented = [name for name, _, meaning in rows if len(meaning) < 10]
    assert undocumented == []
    assert env_name("train_poll_s") == "FLYWHEEL_TRAIN_POLL_S" and "FLYWHEEL_TRAIN_POLL_S" in names
