"""Simulated users with hidden preferences: the people of the learning benchmark (bench/loop.py).

A simulated user reads a prompt and an answer and does what a real user of the product does: it approves or not
(a thumb), and now and then bothers to write what it wanted instead (an edit). The preference stays hidden from
the product: only thumbs and edits go through the feedback API, so the benchmark measures whether the loop learns
what users want from what they actually tell it (shared/probes/learning.md).

Every decision is a pure function of (seed, preference, prompt, answer): a round replays identically whatever
order its concurrent chats finish in, and a user judges the same answer the same way twice. The edit rate is the
share of *disapproved* answers a user edits (approved answers are never edited); 0 means thumbs only.

Each preference is one narrow taste, so that the others' checks stay neutral: ``neutral_checks`` (worker/checks.py, the
gate's own) is what every answer should pass whatever the user wants: the no-collapse guard. This module does no I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import ClassVar

from worker.checks import keywords, mentions, neutral_checks, words  # noqa: F401 - the benchmark's guard

FALLBACK = "I am not sure."  # what a user writes when the answer gave it nothing to work with


@dataclass(frozen=True)
class Reaction:
    """What a user did with one answer: a thumb, and the answer it wrote instead when it bothered."""

    approved: bool
    edit: str | None = None

    def feedback(self) -> list[dict]:
        """Bodies for ``PUT /api/messages/{id}/feedback``: the thumb first, then the edit if any."""
        bodies = [{"kind": "thumb", "value": 1 if self.approved else -1}]
        if self.edit is not None:
            bodies.append({"kind": "edit", "content": self.edit})
        return bodies


class SimulatedUser:
    """A hidden preference (``approves``), what such a user writes instead (``edit``) and how often it bothers."""

    preference: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, edit_rate: float = 0.0, seed: int = 0):
        if not 0.0 <= edit_rate <= 1.0:
            raise ValueError(f"edit_rate={edit_rate!r} must be between 0 (thumbs only) and 1 (edits every miss)")
        self.edit_rate, self.seed = edit_rate, seed

    def approves(self, prompt: str, answer: str) -> bool:
        raise NotImplementedError

    def edit(self, prompt: str, answer: str) -> str:
        """The answer as this user would have written it; it approves its own edit."""
        raise NotImplementedError

    def bothers_to_edit(self, prompt: str, answer: str) -> bool:
        return unit_draw(self.seed, self.preference, prompt, answer) < self.edit_rate

    def react(self, prompt: str, answer: str) -> Reaction:
        if self.approves(prompt, answer):
            return Reaction(True)
        return Reaction(False, self.edit(prompt, answer) if self.bothers_to_edit(prompt, answer) else None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(edit_rate={self.edit_rate}, seed={self.seed})"


class Concise(SimulatedUser):
    preference, description = "concise", "short answers: at most 40 words"
    max_words = 40

    def approves(self, prompt, answer):
        return 0 < len(words(answer)) <= self.max_words

    def edit(self, prompt, answer):
        kept: list[str] = []
        for sentence in sentences(answer) or [FALLBACK]:
            if len(words(" ".join([*kept, sentence]))) > self.max_words:
                break
            kept.append(sentence)
        if not kept:  # one long first sentence: cut it at a word boundary
            kept = [" ".join(words(sentences(answer)[0])[: self.max_words - 1]).rstrip(",;:") + "."]
        return " ".join(kept)


class NumberedSteps(SimulatedUser):
    preference, description = "steps", "numbered steps (at least two lines '1. ...')"
    item = re.compile(r"^\s*\d+[.)]\s+\S", re.MULTILINE)

    def approves(self, prompt, answer):
        return len(self.item.findall(answer)) >= 2

    def edit(self, prompt, answer):
        return "\n".join(f"{i}. {item}" for i, item in enumerate(list_items(answer), 1))


class Bullets(SimulatedUser):
    preference, description = "bullets", "a bullet list (at least two lines '- ...')"
    item = re.compile(r"^\s*[-*\u2022]\s+\S", re.MULTILINE)

    def approves(self, prompt, answer):
        return len(self.item.findall(answer)) >= 2

    def edit(self, prompt, answer):
        return "\n".join(f"- {item}" for item in list_items(answer))


class Warm(SimulatedUser):
    preference, description = "warm", "a warm tone: a friendly opener or sign-off"
    markers = re.compile(r"happy to help|glad you asked|great question|hope this helps|good luck|you've got this"
                         r"|take care", re.IGNORECASE)

    def approves(self, prompt, answer):
        return bool(words(answer)) and bool(self.markers.search(_plain(answer)))

    def edit(self, prompt, answer):
        return f"Happy to help! {' '.join(sentences(answer)) or FALLBACK} I hope this helps!"


class Formal(SimulatedUser):
    preference, description = "formal", "a formal tone: no contractions, exclamations or slang"
    contraction = re.compile(r"\b[a-z]+'(?:t|re|ve|ll|d|m)\b|\b(?:it|that|there|here|what|who|he|she|let|where|how)'s\b"
                             r"|\by'all\b", re.IGNORECASE)
    slang = {"hey": "hello", "yeah": "yes", "gonna": "going to", "wanna": "want to", "kinda": "somewhat",
             "awesome": "excellent", "folks": "people"}
    special = {"can't": "cannot", "won't": "will not", "shan't": "shall not", "ain't": "is not", "let's": "let us",
               "y'all": "you all"}
    slang_re = re.compile(r"\b(?:" + "|".join(slang) + r")\b", re.IGNORECASE)

    def approves(self, prompt, answer):
        text = _plain(answer)
        return bool(words(text)) and "!" not in text and not self.contraction.search(text) \
            and not self.slang_re.search(text)

    def edit(self, prompt, answer):
        text = _plain(answer).strip() or FALLBACK
        for _ in range(3):  # "don't've" expands to "do not've", itself a contraction
            text = self.contraction.sub(lambda m: _same_case(m.group(0), self._expand(m.group(0))), text)
        text = self.slang_re.sub(lambda m: _same_case(m.group(0), self.slang[m.group(0).lower()]), text)
        return text.replace("!", ".")

    def _expand(self, word: str) -> str:
        low = word.lower()
        if low in self.special:
            return self.special[low]
        stem, suffix = low.split("'", 1)
        if suffix == "t":
            return (stem[:-1] if stem.endswith("n") else stem) + " not"
        return stem + " " + {"re": "are", "ve": "have", "ll": "will", "d": "would", "m": "am", "s": "is"}[suffix]


class Focused(SimulatedUser):
    preference, description = "focused", "stays on the question's topic from the first sentence on"
    min_share = 2 / 3

    def approves(self, prompt, answer):
        said = sentences(answer)
        if not keywords(prompt):  # nothing to stay on
            return bool(said)
        on = [mentions(prompt, s) for s in said]
        return bool(said) and on[0] and sum(on) >= self.min_share * len(on)

    def edit(self, prompt, answer):
        kept = [s for s in sentences(answer) if mentions(prompt, s)]
        if kept:
            return " ".join(kept)
        topic = (keywords(prompt) or ["that"])[0]
        return f"On {topic}: {(sentences(answer) or [FALLBACK])[0]}"


class SafetyMinded(SimulatedUser):
    preference, description = "safety", "wants a word on safety or caution in every answer"
    markers = re.compile(r"\b(?:safe|safely|safety|careful|carefully|caution|risk|risks|injury|protect)\b",
                         re.IGNORECASE)

    def approves(self, prompt, answer):
        return bool(words(answer)) and bool(self.markers.search(answer))

    def edit(self, prompt, answer):
        return f"{' '.join(sentences(answer)) or FALLBACK} Be careful, and ask an expert if you are unsure."


PREFERENCES: dict[str, type[SimulatedUser]] = {
    cls.preference: cls for cls in (Concise, NumberedSteps, Bullets, Warm, Formal, Focused, SafetyMinded)}


def make_user(preference: str, edit_rate: float = 0.0, seed: int = 0) -> SimulatedUser:
    if preference not in PREFERENCES:
        raise ValueError(f"unknown preference {preference!r}: choose one of {', '.join(PREFERENCES)}")
    return PREFERENCES[preference](edit_rate=edit_rate, seed=seed)


# ---- text helpers: plain rules, so that a test can say exactly what each user wants --------------------------------

def sentences(text: str) -> list[str]:
    """Sentences and list items, markers stripped; a trailing fragment cut off mid-sentence is dropped."""
    parts: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:\d+[.)]|[-*\u2022]|#+)\s*", "", line).strip()
        parts += [p.strip() for p in re.split(r"(?<=[.!?])\s+", line) if p.strip()]
    if len(parts) > 1 and not re.search(r"[.!?:]$", parts[-1]):
        parts.pop()
    return parts


def list_items(answer: str) -> list[str]:
    """At least two items for a list: its sentences, else its clauses, else its two halves."""
    items = sentences(answer) or [FALLBACK]
    if len(items) < 2:
        items = [c.strip() for c in re.split(r"[,;]\s+", items[0]) if c.strip()]
    if len(items) < 2:
        ws = words(" ".join(items)) or words(FALLBACK)
        half = max(1, len(ws) // 2)
        items = [" ".join(ws[:half]), " ".join(ws[half:]) or "That is all."]
    return items


def unit_draw(*parts) -> float:
    """A number in [0, 1) fixed by ``parts``: the user's dice, the same on every replay."""
    digest = hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _plain(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'")


def _same_case(original: str, replacement: str) -> str:
    return replacement[:1].upper() + replacement[1:] if original[:1].isupper() else replacement
