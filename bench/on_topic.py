"""How the no-collapse "on topic" rule reads answers: keywords alone against keywords or the base model's likelihood.

``worker/checks.py`` calls an answer on topic when it names one of the question's content words, or else when the
base model finds it at least ``RELEVANCE_MARGIN`` nats likelier after its own question than after each of
``RELEVANCE_OTHERS`` other questions. This script reads the held-out answers ``bench/loop.py`` stored per round and
reports, per round, the share of answers each rule passes. Controls the rules must fail, on the same questions
(once per run, from its first round): each answer given to the question 7 places on (``shuffled``), and one
generic reply to every question (``generic``).
The keywords-only rule is the baseline; the rule is useful when it passes a run's own answers as often or more and
the controls about as rarely.

Run: ``python bench/on_topic.py bench/results/loop-<timestamp>.json`` (the default model fetched). Prints a table
and writes JSON to bench/results/on-topic-<UTC timestamp>.json (or --out).
"""

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from serve import format_table  # bench/serve.py: a sibling

from service.engine.weights import load_pretrained
from service.settings import Settings
from worker.checks import neutral_checks, with_relevance

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GENERIC = "I'm sorry, I can't help with that. Is there anything else I can do for you?"


def shares(model, tokenizer, questions: list[str], answers: list[str], finished: list[bool]) -> tuple[float, float]:
    """(keywords only, keywords or likelihood): the share of ``answers`` each rule calls on topic."""
    rules = [neutral_checks(q, a, f) for q, a, f in zip(questions, answers, finished, strict=True)]
    both = with_relevance(model, tokenizer, questions, answers, rules)
    return (sum(c["on_topic"] for c in rules) / len(rules), sum(c["on_topic"] for c in both) / len(both))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench/loop.py JSON files")
    parser.add_argument("--base-model", default=Settings.from_env({}).base_model)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_pretrained(args.base_model)
    model.eval()
    rows = []
    for path in args.results:
        for result in json.loads(path.read_text())["results"]:
            controlled = False  # the controls once per run, on its first round's questions
            for r in result["rounds"]:
                answers = r.get("answers") or []
                if not answers:
                    continue
                questions = [a["prompt"] for a in answers]
                texts = [a["answer"] for a in answers]
                finished = [a["finished"] for a in answers]
                label = f"{path.stem} {result['preference']} {result['edit_rate']:g} r{r['round']}"
                row = {"answers": label, "n": len(texts), "own": shares(model, tokenizer, questions, texts, finished)}
                if not controlled:
                    controlled = True
                    moved = texts[7 % len(texts):] + texts[:7 % len(texts)]
                    row["shuffled"] = shares(model, tokenizer, questions, moved, [True] * len(texts))
                    row["generic"] = shares(model, tokenizer, questions, [GENERIC] * len(texts), [True] * len(texts))
                rows.append(row)
    print(format_table(["answers", "n", "own: keywords", "own: +likelihood", "shuffled: keywords",
                        "shuffled: +likelihood", "generic: keywords", "generic: +likelihood"],
                       [[r["answers"], r["n"], *r["own"], *r.get("shuffled", (None, None)),
                         *r.get("generic", (None, None))] for r in rows]))
    out = args.out or RESULTS_DIR / f"on-topic-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"base_model": args.base_model, "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
