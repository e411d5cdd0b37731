"""How much of what users approve the worker can imitate: cut-off answers dropped, or counted by their complete part.

The worker's SFT stage imitates approved answers and best-of-k picks that pass the no-collapse checks
(worker/checks.py). The default model writes long answers, and at the benchmark's 128 tokens many stop at the limit.
This script samples ``--k`` answers per training prompt from the base model, as users of round 1 see them
(temperature 0.9), and counts per preference, both ways (``dropped``: only answers that end finished;
``complete part``: a cut-off answer by ``complete_part``, what precedes its last complete sentence):
the first answer per prompt that the simulated user approves and the worker can imitate (the SFT rows of a
thumbs-only round), whether the user still approves the complete part, and the best-of-k samples that may compete.

Run: ``python bench/imitable.py`` (the default model fetched). Prints a table and writes JSON to
bench/results/imitable-<UTC timestamp>.json (or --out).
"""

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from prompts import load_prompts, split  # bench/: siblings
from serve import format_table
from users import PREFERENCES, make_user

from service.engine.weights import load_pretrained
from service.settings import Settings
from worker.checks import complete_part, neutral_checks
from worker.sampling import SAMPLE_TEMPERATURE, generate

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def usable(question: str, text: str, finished: bool, by_complete_part: bool) -> str:
    """What the worker would imitate of this answer ("" when nothing)."""
    part = complete_part(text) if by_complete_part else text.strip() if finished else ""
    return part if part and all(neutral_checks(question, part).values()) else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default=Settings.from_env({}).base_model)
    parser.add_argument("--prompts", type=int, default=64, help="training prompts (a round's 64 votes)")
    parser.add_argument("--k", type=int, default=4, help="samples per prompt; the first is what the user rates")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="bench/loop.py's --max-tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_pretrained(args.base_model)
    model.eval()
    questions = [p.text for p in split(load_prompts())["train"][:args.prompts]]
    samples = generate(model, tokenizer, [[{"role": "user", "content": q}] for q in questions], k=args.k,
                       max_new_tokens=args.max_new_tokens, temperature=SAMPLE_TEMPERATURE, seed=args.seed)
    flat = [(q, a) for q, answers in zip(questions, samples, strict=True) for a in answers]
    rows = []
    for preference in sorted(PREFERENCES):
        user = make_user(preference)
        rated = [(q, answers[0]) for q, answers in zip(questions, samples, strict=True) if answers]
        approved = [(q, a) for q, a in rated if user.approves(q, a.text)]
        row = {"preference": preference, "rated": len(rated), "approved": len(approved),
               "approved_cut_off": sum(not a.finished for _, a in approved)}
        for way, by_part in (("dropped", False), ("complete_part", True)):
            parts = [usable(q, a.text, a.finished, by_part) for q, a in approved]
            row[f"sft_rows_{way}"] = sum(map(bool, parts))
            row[f"sft_rows_still_approved_{way}"] = sum(bool(p) and user.approves(q, p)
                                                        for (q, _), p in zip(approved, parts, strict=True))
            competing = [(q, p) for q, a in flat if (p := usable(q, a.text, a.finished, by_part))]
            row[f"best_of_k_usable_{way}"] = len(competing)
            row[f"best_of_k_usable_approved_{way}"] = sum(user.approves(q, p) for q, p in competing)
        rows.append(row)
    print(f"\n{len(flat)} samples to {len(questions)} training prompts, "
          f"{sum(not a.finished for _, a in flat)} cut off at {args.max_new_tokens} tokens\n")
    print(format_table(["preference", "approved", "cut off", "SFT rows: dropped", "still approved",
                        "SFT rows: complete part", "still approved", "best-of-k usable: dropped", "approved",
                        "best-of-k usable: complete part", "approved"],
                       [[r["preference"], f"{r['approved']}/{r['rated']}", r["approved_cut_off"],
                         r["sft_rows_dropped"], r["sft_rows_still_approved_dropped"], r["sft_rows_complete_part"],
                         r["sft_rows_still_approved_complete_part"], r["best_of_k_usable_dropped"],
                         r["best_of_k_usable_approved_dropped"], r["best_of_k_usable_complete_part"],
                         r["best_of_k_usable_approved_complete_part"]] for r in rows]))
    created = datetime.now(UTC)
    out = args.out or RESULTS_DIR / f"imitable-{created:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"created_utc": created.isoformat(), "settings": vars(args) | {"out": str(out)},
                               "samples": len(flat), "cut_off": sum(not a.finished for _, a in flat),
                               "rows": rows}, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
