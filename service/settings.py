"""Settings: one typed object built from ``FLYWHEEL_*`` environment variables.

Every field lives in a group (database, redis, model, engine, training, rollout, auth, server) but the variable
names are flat: field ``train_poll_s`` of the training group is ``FLYWHEEL_TRAIN_POLL_S``. Settings are read once,
at an entry point (CLI command, worker, tests), and passed down; nothing reads ``os.environ`` elsewhere.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from worker.train import Algorithm

PREFIX = "FLYWHEEL_"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _doc(text: str, **constraints: Any) -> Meta:
    return Meta(description=text, **constraints)


class DatabaseSettings(msgspec.Struct, frozen=True, kw_only=True):
    database_url: Annotated[
        str | None,
        _doc("PostgreSQL URL, e.g. postgresql://user:pass@host:5432/flywheel. Unset: 127.0.0.1:5432/flywheel, "
             "or (for `flywheel up`) an embedded PostgreSQL when nothing answers there."),
    ] = None
    database_pool_size: Annotated[int, _doc("Connections in each process's asyncpg pool.", ge=1, le=200)] = 10
    auto_migrate: Annotated[bool, _doc("Apply pending schema migrations when the service or worker starts.")] = True


class RedisSettings(msgspec.Struct, frozen=True, kw_only=True):
    redis_url: Annotated[
        str | None,
        _doc("Redis URL, e.g. redis://host:6379/0. Unset: redis://127.0.0.1:6379/0, or (for `flywheel up`) an "
             "embedded Redis when nothing answers there."),
    ] = None


class ModelSettings(msgspec.Struct, frozen=True, kw_only=True):
    data_dir: Annotated[
        str,
        _doc("Where Flywheel keeps its state (embedded database, adapters, logs). Keep it outside a private home "
             "folder when running as root: the embedded PostgreSQL runs as its own user."),
    ] = ".flywheel"
    model_dir: Annotated[
        str, _doc("Where converted base models are kept; shared between checkouts so a model converts once.")
    ] = "~/.cache/flywheel/models"
    base_model: Annotated[
        str | None,
        _doc(f"Base model: a local Hugging Face folder or a hub id. Unset: {DEFAULT_MODEL_NAME} under "
             "FLYWHEEL_MODEL_DIR, provisioned by `flywheel model fetch-default`."),
    ] = None
    adapter_dir: Annotated[
        str | None, _doc("Where LoRA adapters are stored, one folder per version. Unset: FLYWHEEL_DATA_DIR/adapters.")
    ] = None


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True):
    engine: Annotated[
        Literal["local", "vllm", "remote"],
        _doc("Inference engine: local (transformers+peft, CPU or GPU), vllm (in-process, GPU extra) or remote "
             "(an OpenAI-compatible server with runtime LoRA loading)."),
    ] = "local"
    engine_url: Annotated[str | None, _doc("Base URL of the server the remote engine talks to.")] = None
    device: Annotated[
        Literal["auto", "cpu", "cuda"], _doc("Device for the local engine; auto picks CUDA if present.")
    ] = "auto"
    dtype: Annotated[
        Literal["auto", "float32", "bfloat16", "float16"],
        _doc("Weights dtype for serving; auto is float32 on CPU, bfloat16 on GPU."),
    ] = "auto"
    max_batch_size: Annotated[int, _doc("Most requests decoded together in one step.", ge=1, le=1024)] = 16
    max_loaded_adapters: Annotated[
        int, _doc("Cap on adapters held in memory (least recently used beyond it; production and canary stay).", ge=1)
    ] = 8
    max_tokens_default: Annotated[int, _doc("Completion length when a request names none.", ge=1)] = 512
    max_queued: Annotated[int, _doc("Requests that may wait for a batch slot before new ones get 503.", ge=1)] = 256


class TrainingSettings(msgspec.Struct, frozen=True, kw_only=True):
    train_poll_s: Annotated[float, _doc("Seconds between the worker's checks for enough new feedback.", gt=0)] = 30.0
    train_min_new: Annotated[int, _doc("Usable new feedback items that trigger a training run.", ge=1)] = 32
    train_interval_s: Annotated[
        float, _doc("Train anyway when this many seconds passed since the last run and any feedback is new.", gt=0)
    ] = 86400.0
    train_algorithm: Annotated[
        Algorithm, _doc("Algorithm for triggered runs; auto picks from the data, rl optimises the run's reward model.")
    ] = "auto"
    train_max_steps: Annotated[
        Annotated[int, Meta(ge=1)] | None, _doc("Steps per training stage; unset: the epochs of the train config.")
    ] = None
    train_start_from: Annotated[
        Literal["base", "production"], _doc("Train a fresh LoRA on the base, or continue the production adapter.")
    ] = "base"
    heldout_fraction: Annotated[
        float, _doc("Share of prompts held out of training for the evaluation gate.", ge=0.0, lt=1.0)
    ] = 0.15
    max_owner_share: Annotated[
        float, _doc("Largest share of any training set one API key may contribute.", gt=0.0, le=1.0)
    ] = 0.2
    reward_min_pairs: Annotated[
        int, _doc("Preference pairs (thumb pairs included) a run needs to train its reward model, the gate's judge; "
                  "0 never trains one.", ge=0)
    ] = 16
    reward_validation_share: Annotated[
        float, _doc("Share of training prompts whose votes the reward model sets aside, besides the held-out ones, to "
                    "measure whether it can be trusted.", ge=0.0, lt=1.0)
    ] = 0.15
    reward_max_steps: Annotated[
        int, _doc("Steps the run's reward model trains at most: its cost grows with the votes, and a judge needs to "
                  "rank answers, not to converge.", ge=1)
    ] = 16
    # A thumbs-only concise round (bench/loop.py, seed 1): k=16 took held-out approval 4% -> 21% -> 56% in 419 and
    # 548 s a round; k=8 4% -> 12% -> 15% in 287 and 406 s. A replay of one round: k=16 21%, k=8 15%, k=4 lower.
    best_of_k: Annotated[
        int, _doc("Answers sampled per training prompt when the reward model is trusted and users' edits and "
                  "approved answers make fewer than 16 SFT rows; its favourite becomes an SFT target (rejection "
                  "sampling). 0 or 1: off.", ge=0, le=16)
    ] = 16
    best_of_prompts: Annotated[int, _doc("Training prompts sampled for best-of-k per run.", ge=1)] = 32
    # Best-of-16 sampled 218-333 s a round in such runs, and the rest of a round took 220-280 s: 240 s keeps a round
    # near 9 minutes here.
    best_of_seconds: Annotated[
        float, _doc("Seconds after which best-of-k starts no more samples in a run (those under way finish; prompts "
                    "not reached get no pick), so a round stays near 10 minutes on a slower machine.", gt=0)
    ] = 240.0
    # Counted from the run's start (the reward model and best-of-k included), 480 s left SFT 5-37 s in 574-610 s
    # rounds here and changed nothing (approval 31% -> 31%, 44% -> 44%, 4% -> 8%) where replays of the same votes,
    # trained in full (32-40 steps, 77-195 s), reached 85%, 83% and 56% (bench/rl_replay.py). So it bounds only
    # the training steps, with room for those.
    train_seconds: Annotated[
        float, _doc("Seconds after training starts (after the reward model and best-of-k) past which it takes no "
                    "further step; the adapter trained so far is gated like any other.", gt=0)
    ] = 300.0
    gate_prompts: Annotated[
        str | None, _doc("JSONL of everyday prompts every candidate and production answer at the gate, each "
                         '{"prompt": ..., "must": [regex], "must_not": [regex]} (rules optional). Unset: the 32 '
                         "shipped with the worker.")
    ] = None


class RolloutSettings(msgspec.Struct, frozen=True, kw_only=True):
    canary_percent: Annotated[int, _doc("Share of callers routed to a canary adapter.", ge=1, le=50)] = 10
    rollout_min_votes: Annotated[int, _doc("Thumbs each arm needs before a canary is decided.", ge=1)] = 50
    rollout_alpha: Annotated[float, _doc("Significance level of the canary's two-proportion test.", gt=0, lt=1)] = 0.05
    rollout_max_drop: Annotated[
        float, _doc("Approval a canary may lose against production and still be promoted.", ge=0, lt=1)
    ] = 0.05
    rollout_max_canary_hours: Annotated[
        float, _doc("A canary without enough votes after this long is rejected.", gt=0)
    ] = 72.0
    auto_rollout: Annotated[bool, _doc("Let the worker canary, promote and roll back by itself.")] = True
    reconcile_s: Annotated[
        float, _doc("Seconds between each process's reconcile of loaded adapters from Postgres.", gt=0)
    ] = 30.0


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True):
    admin_key: Annotated[
        Annotated[str, Meta(min_length=16)] | None,
        _doc("A bootstrap admin API key (16+ characters) accepted besides the keys in the database; keep it secret."),
    ] = None
    rate_limit_per_min: Annotated[int, _doc("Requests per minute per API key; 0 disables the limit.", ge=0)] = 120
    tokens_per_min: Annotated[
        int, _doc("Generated tokens per minute per API key; 0 disables the limit.", ge=0)
    ] = 20000
    key_cache_s: Annotated[
        float,
        _doc("Seconds a service process trusts an API key it has looked up before asking the database again. "
             "`flywheel keys revoke` reaches every process at once (Postgres NOTIFY); this bounds how long a revoked "
             "key keeps working when that notice is missed. 0 looks the key up on every request.", ge=0, le=60),
    ] = 5.0
    max_messages: Annotated[int, _doc("Most messages one chat request may carry.", ge=1)] = 200
    max_message_chars: Annotated[int, _doc("Longest message content accepted, in characters.", ge=1)] = 32000
    max_tokens_limit: Annotated[int, _doc("Largest max_tokens a request may ask for.", ge=1)] = 4096


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True):
    host: Annotated[str, _doc("Interface the API listens on.")] = "127.0.0.1"
    port: Annotated[int, _doc("Port of the API.", ge=1, le=65535)] = 8000
    ui_port: Annotated[int, _doc("Port of the Gradio UI.", ge=1, le=65535)] = 7860
    api_url: Annotated[str | None, _doc("URL the UI and CLI use to reach the API. Unset: http://HOST:PORT.")] = None
    log_level: Annotated[Literal["debug", "info", "warning", "error"], _doc("Log level of every process.")] = "info"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every knob of Flywheel. Build with ``Settings.from_env()``."""

    db: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    training: TrainingSettings = TrainingSettings()
    rollout: RolloutSettings = RolloutSettings()
    auth: AuthSettings = AuthSettings()
    server: ServerSettings = ServerSettings()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``FLYWHEEL_*`` variables; raise SettingsError naming the first bad or unknown one."""
        environ = os.environ if environ is None else environ
        known = {env_name(f): (group, f) for group, f in _fields()}
        unknown = sorted(
            k for k in environ if k.startswith(PREFIX) and k not in known and not k.startswith(_TEST_PREFIX)
        )
        if unknown:
            raise SettingsError(unknown[0], "unknown setting (see `flywheel config` for the list)")
        raw: dict[str, dict[str, str | None]] = {}
        for name, (group, field) in known.items():
            if name in environ:
                value = environ[name].strip()
                raw.setdefault(group, {})[field] = value if value != "" or field not in _OPTIONAL else None
        try:
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError.from_validation(exc, environ) from None
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-field rules that a single field's type cannot express."""
        if self.engine.engine == "remote" and not self.engine.engine_url:
            raise SettingsError("FLYWHEEL_ENGINE_URL", "required when FLYWHEEL_ENGINE=remote")
        for name, url, schemes in (
            ("FLYWHEEL_DATABASE_URL", self.db.database_url, ("postgres", "postgresql")),
            ("FLYWHEEL_REDIS_URL", self.redis.redis_url, ("redis", "rediss", "unix")),
            ("FLYWHEEL_ENGINE_URL", self.engine.engine_url, ("http", "https")),
            ("FLYWHEEL_API_URL", self.server.api_url, ("http", "https")),
        ):
            if url is not None and url.split("://", 1)[0] not in schemes:
                raise SettingsError(name, f"must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
        if self.training.gate_prompts is not None:
            from worker.evaluate import load_gate_prompts  # the one parser of the file

            try:
                load_gate_prompts(Path(self.training.gate_prompts).expanduser())
            except (OSError, ValueError) as exc:
                raise SettingsError("FLYWHEEL_GATE_PROMPTS", str(exc)) from None

    # Derived values: one place that decides the defaults that depend on other settings.
    @property
    def data_dir(self) -> Path:
        return Path(self.model.data_dir).expanduser().resolve()

    @property
    def model_dir(self) -> Path:
        return Path(self.model.model_dir).expanduser().resolve()

    @property
    def adapter_dir(self) -> Path:
        if self.model.adapter_dir:
            return Path(self.model.adapter_dir).expanduser().resolve()
        return self.data_dir / "adapters"

    @property
    def base_model(self) -> str:
        """A local folder or hub id; the default model's folder when FLYWHEEL_BASE_MODEL is unset."""
        return self.model.base_model or str(self.model_dir / DEFAULT_MODEL_NAME)

    @property
    def database_url(self) -> str:
        return self.db.database_url or DEFAULT_DATABASE_URL

    @property
    def redis_url(self) -> str:
        return self.redis.redis_url or DEFAULT_REDIS_URL

    @property
    def api_url(self) -> str:
        host = "127.0.0.1" if self.server.host in ("0.0.0.0", "::") else self.server.host
        return self.server.api_url or f"http://{host}:{self.server.port}"

    def describe(self) -> list[tuple[str, str, str]]:
        """(variable, effective value with secrets masked, help) for every setting."""
        rows = []
        for group, field in _fields():
            value = getattr(getattr(self, group), field)
            rows.append((env_name(field), mask(field, value), _help(group, field)))
        return rows


DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/flywheel"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_SECRET_FIELDS = {"admin_key"}
# FLYWHEEL_TEST_* variables configure the test suite, not the product.
_TEST_PREFIX = "FLYWHEEL_TEST_"
_GROUPS = {f.name: f.type for f in msgspec.structs.fields(Settings)}
_OPTIONAL = {
    f.name for t in _GROUPS.values() for f in msgspec.structs.fields(t) if f.default is None
}


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def _fields() -> list[tuple[str, str]]:
    return [(g, f.name) for g, t in _GROUPS.items() for f in msgspec.structs.fields(t)]


def _field_type(group: str, field: str) -> Any:
    return typing.get_type_hints(_GROUPS[group], include_extras=True)[field]


def _help(group: str, field: str) -> str:
    metas = [m for m in getattr(_field_type(group, field), "__metadata__", ()) if isinstance(m, Meta)]
    return next((m.description for m in metas if m.description), "")


def _literal_args(annotated: Any) -> tuple[str, ...]:
    inner = typing.get_args(annotated)[0] if typing.get_origin(annotated) is Annotated else annotated
    return typing.get_args(inner) if typing.get_origin(inner) is Literal else ()


def mask(field: str, value: Any) -> str:
    """A value fit to print: secrets become ***, passwords inside URLs too."""
    if value is None:
        return "(unset)"
    if field in _SECRET_FIELDS:
        return "***"
    text = str(value)
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", text)


class SettingsError(ValueError):
    """A bad setting; str() is one line naming the variable, fit to show a user as is."""

    def __init__(self, variable: str, problem: str):
        self.variable, self.problem = variable, problem
        super().__init__(f"{variable}: {problem}")

    @classmethod
    def from_validation(cls, exc: msgspec.ValidationError, environ: Mapping[str, str]) -> SettingsError:
        # msgspec says e.g. "Expected `int` >= 1 - at `$.server.port`"; name the variable and echo its value.
        message = str(exc)
        match = re.search(r"at `\$\.(\w+)\.(\w+)`", message)
        if not match:
            return cls("FLYWHEEL_*", message)
        field = match.group(2)
        variable = env_name(field)
        choices = _literal_args(_field_type(match.group(1), field))
        if choices:
            problem = f"must be one of {', '.join(choices)}"
        else:  # "Expected `int` >= 1, got `str`" -> "expected int >= 1"
            problem = message[: match.start()].rstrip(" -").split(", got")[0].replace("Expected", "expected")
            problem = problem.replace("`", "")
        shown = "***" if field in _SECRET_FIELDS else repr(environ.get(variable, ""))
        return cls(variable, f"{problem}, got {shown}")
