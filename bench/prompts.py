"""The benchmark's everyday prompts (bench/prompts.txt) and their stable train / held-out split.

Simulated users ask the train prompts; held-out approval is measured on greedy answers to held-out prompts, which
no user ever asks, so a gain there is learned behaviour, not memorised answers. The side a prompt falls on is a
hash of its normalised text, not its position: editing, adding or reordering lines never moves another prompt
across, and every process agrees. This split is the benchmark's own; the worker's held-out split of feedback
(worker/data.py) is a different one, over what users did ask.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PROMPTS_FILE = Path(__file__).resolve().parent / "prompts.txt"
HELDOUT_FRACTION = 0.25
KINDS = ("how-to", "explain", "list", "advice", "factual")
Side = Literal["train", "heldout"]


@dataclass(frozen=True)
class Prompt:
    text: str
    kind: str


def load_prompts(path: Path = PROMPTS_FILE) -> list[Prompt]:
    """Every prompt in file order; a duplicate (after normalising) or a line before any kind is an error."""
    prompts, kind, seen = [], None, set()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("# kind:"):
            kind = line.removeprefix("# kind:").strip()
            if kind not in KINDS:
                raise ValueError(f"{path}:{number}: unknown kind {kind!r}, expected one of {', '.join(KINDS)}")
        elif line and not line.startswith("#"):
            if kind is None:
                raise ValueError(f"{path}:{number}: a prompt before the first '# kind:' line")
            if normalised(line) in seen:
                raise ValueError(f"{path}:{number}: duplicate prompt {line!r}")
            seen.add(normalised(line))
            prompts.append(Prompt(line, kind))
    return prompts


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def side(text: str, heldout_fraction: float = HELDOUT_FRACTION) -> Side:
    bucket = int(hashlib.sha256(f"bench-heldout:{normalised(text)}".encode()).hexdigest(), 16) % 10_000
    return "heldout" if bucket < heldout_fraction * 10_000 else "train"


def split(prompts: list[Prompt], heldout_fraction: float = HELDOUT_FRACTION) -> dict[Side, list[Prompt]]:
    parts: dict[Side, list[Prompt]] = {"train": [], "heldout": []}
    for prompt in prompts:
        parts[side(prompt.text, heldout_fraction)].append(prompt)
    return parts
