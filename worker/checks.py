"""What every answer should pass whatever users prefer: the no-collapse checks of the gate and the benchmark.

A LoRA pushed hard toward one taste (shorter, warmer, in bullets) can break answers in ways its users' votes never
mention: empty replies, loops, answers cut off mid-word, answers about something else. These rules are plain
on purpose, so that a regression is obvious from the answer itself.
"""

from __future__ import annotations

import re

_STOPWORDS = """a an and are as at be best can could do does for from good have how i if in is it its me my of on
or should so some that the their there these this to was we what when where which who why will with would you your
any about into than then them they just give tell name list explain make get keep use way ways much many need want
there's what's it's i'm don't without ever never"""
STOPWORDS = frozenset(_STOPWORDS.split())
CHECKS = ("not_empty", "on_topic", "not_looping", "finished")


def neutral_checks(prompt: str, answer: str, finished: bool = True) -> dict[str, bool]:
    """One verdict per check in CHECKS; ``finished`` is False when generation stopped at its token limit."""
    tokens = [w.lower() for w in words(answer)]
    trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    looping = len(trigrams) >= 6 and len(set(trigrams)) < 0.5 * len(trigrams)
    return {"not_empty": bool(tokens), "on_topic": not keywords(prompt) or mentions(prompt, answer),
            "not_looping": not looping, "finished": finished and bool(re.search(r"[.!?)\]\"'*:]\s*$", answer))}


def pass_rates(checked: list[dict[str, bool]]) -> dict[str, float]:
    """Share of answers passing each check (1.0 each when there are none)."""
    return {name: sum(c[name] for c in checked) / len(checked) if checked else 1.0 for name in CHECKS}


def words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def keywords(prompt: str) -> list[str]:
    """The content words of a prompt, in order: what an answer on topic mentions."""
    found = [w for w in re.findall(r"[a-z][a-z'-]+", prompt.lower()) if len(w) >= 3 and w not in STOPWORDS]
    return list(dict.fromkeys(found))


def mentions(prompt: str, text: str) -> bool:
    """Whether ``text`` names one of the prompt's keywords (compared on their first five letters)."""
    stems = {k[:5] for k in keywords(prompt)}
    return any(w[:5] in stems for w in re.findall(r"[a-z][a-z'-]+", text.lower()))
