"""One request inside the local engine: its tokens, its sampler and its incremental detokenizer.

Sampling follows OpenAI's knobs (temperature, top_p, frequency and presence penalties, seed). Text is released
only when it is final: never half of a multi-byte character, never the start of what may become a stop sequence.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import torch

from service.engine.base import Chunk, FinishReason, SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    adapter: str
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already sent
    cancelled: bool = False
    finish: FinishReason | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.sampling.temperature > 0:
            self.generator = torch.Generator()
            if self.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.sampling.seed)

    def send(self, chunk: Chunk) -> None:
        """Hand a chunk to the request's event loop (called from the engine thread)."""
        self.loop.call_soon_threadsafe(self.out.put_nowait, chunk)

    def advance(self, token: int, text: str, eos_ids: set[int]) -> None:
        """Record the sampled token and its decoded text so far; send what is final; set ``finish`` when done."""
        self.tokens.append(token)
        stop_at, hold = _find_stop(text, self.sampling.stop, self.emitted)
        if stop_at is not None:
            self._emit(text[:stop_at], "stop")
        elif token in eos_ids and not self.sampling.ignore_eos:
            self._emit(text, "stop")
        elif len(self.tokens) >= self.max_tokens:
            self._emit(text, "length")
        else:
            final = len(text) - hold
            while final > self.emitted and text[final - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                final -= 1
            self._emit(text[:final], None)

    def _emit(self, text: str, finish: FinishReason | None) -> None:
        new = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        self.finish = finish
        if new or finish:
            self.send(Chunk(new, finish, len(self.prompt), len(self.tokens)))


def _find_stop(text: str, stops: tuple[str, ...], emitted: int) -> tuple[int | None, int]:
    """(where the first stop sequence starts, or None; how many trailing characters might begin one)."""
    if not stops:
        return None, 0
    longest = max(len(s) for s in stops)
    window_start = max(0, emitted - longest)
    hits = [i for s in stops if (i := text.find(s, window_start)) != -1]
    if hits:
        return min(hits), 0
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return None, hold


def sample(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """One token per row from the last-position logits [rows, vocab]."""
    logits = logits.float()
    chosen: list[int] = []
    for row, seq in enumerate(sequences):
        s = seq.sampling
        scores = logits[row]
        if (s.frequency_penalty or s.presence_penalty) and seq.tokens:
            counts = torch.bincount(torch.tensor(seq.tokens), minlength=scores.shape[0])[: scores.shape[0]]
            scores = scores - s.frequency_penalty * counts - s.presence_penalty * (counts > 0)
        if s.temperature <= 0:
            chosen.append(int(scores.argmax()))
            continue
        probs = torch.softmax(scores / s.temperature, dim=-1)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > s.top_p  # keep the smallest set reaching top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        chosen.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    return chosen
