"""The Engine protocol: what the service needs from whatever runs the model.

An engine turns chat messages into streamed text for one adapter (or the base model), and loads and unloads LoRA
adapters by name at run time. It knows nothing about users, conversations or the registry: the service resolves
which adapter a request uses and verifies nothing but the files it is handed. Implementations: ``local``
(transformers + peft, this repo), ``vllm`` and ``remote`` (an OpenAI-compatible server), each behind this protocol.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

BASE = "base"  # the name of "no adapter" in every engine
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling knobs. temperature 0 is greedy; seed makes sampling repeatable per request."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False  # benchmarks: always generate max_tokens


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[dict[str, str]]
    sampling: SamplingParams
    adapter: str = BASE


@dataclass
class Chunk:
    """New text since the last chunk; the last chunk of a request has finish_reason and the token counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class EngineHealth:
    ok: bool
    model: str
    loaded_adapters: list[str] = field(default_factory=list)
    queue_depth: int = 0
    running: int = 0
    detail: str = ""


class EngineError(Exception):
    """Base of what an engine raises; the service maps these to HTTP."""


class PromptTooLong(EngineError):
    def __init__(self, prompt_tokens: int, max_tokens: int, context: int):
        super().__init__(f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, which exceeds the "
                         f"model's context of {context} tokens; shorten the messages or lower max_tokens")
        self.prompt_tokens, self.max_tokens, self.context = prompt_tokens, max_tokens, context


class AdapterNotLoaded(EngineError):
    pass


class AdapterLoadError(EngineError):
    """The adapter's files are missing, fail their checksum, or do not fit the base model; nothing changed."""


class EngineOverloaded(EngineError):
    pass


@runtime_checkable
class Engine(Protocol):
    model_name: str
    context_length: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        """Stream the answer. Closing the iterator early (client gone) aborts the request and frees its slot."""
        ...

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int: ...

    async def load_adapter(self, name: str, path: str, sha256: str | None = None) -> None:
        """Load an adapter under a new name; idempotent; raises AdapterLoadError and changes nothing on failure."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Unload once its in-flight requests finish; a no-op for an unknown name; the base is never unloaded."""
        ...

    def loaded(self) -> set[str]: ...

    def health(self) -> EngineHealth: ...
