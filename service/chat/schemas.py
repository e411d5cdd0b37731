"""Request and response shapes of the chat API: OpenAI's for /v1, Flywheel's own for /api/conversations.

Fields we do not support (tools, logprobs, n > 1, ...) are refused with a 400 that names them rather than
silently ignored, so a client never believes it got something it did not.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Role = Literal["system", "user", "assistant"]


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Role
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True):
    """Sampling knobs shared by every endpoint that generates."""

    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Meta(gt=0, le=1)] = 1.0
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2, le=2)] = 0.0
    presence_penalty: Annotated[float, Meta(ge=-2, le=2)] = 0.0
    ignore_eos: bool = False  # extension (as in vLLM): generate max_tokens whatever, for benchmarks


class ChatCompletionRequest(SamplingFields, forbid_unknown_fields=True, kw_only=True):
    model: str
    messages: list[ChatMessage]
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class NewConversation(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    title: Annotated[str, Meta(max_length=200)] = ""
    system: str | None = None


class NewUserMessage(SamplingFields, forbid_unknown_fields=True, kw_only=True):
    content: str
    model: str = "flywheel"
    stream: bool = True
    parent_id: str | None = None  # answer after this message instead of the latest one


class Regenerate(SamplingFields, forbid_unknown_fields=True, kw_only=True):
    model: str = "flywheel"
    stream: bool = True


class LoadLoraAdapter(msgspec.Struct, forbid_unknown_fields=True):
    lora_name: Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:-]+$")]
    lora_path: str


class UnloadLoraAdapter(msgspec.Struct, forbid_unknown_fields=True):
    lora_name: str
