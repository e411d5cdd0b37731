"""Replay one learning-benchmark round offline and compare training settings on the same votes and the same judge.

``bench/loop.py`` keeps its database (``flywheel_loop_bench``) and data folder (``bench/results/loop-data``) after a
run. This script rebuilds the worker's training data from that database exactly as a run does, takes the newest
reward model the run trained (with ``--run N``: the votes training run N saw and the judge it trained; SFT
variants need none, so a round with too few pairs for one replays too), and for the
baseline (``rl``'s defaults, or ``--baseline``) and each ``--variant`` trains with ``worker.train.train_adapter``
from the base; then the adapter answers the benchmark's held-out prompts greedily, judged by the hidden preference
(approval), with mean words and the no-collapse checks. Ratios are against the baseline of the same run. With
``--run N`` best-of-k samples from what served when run N started, as the worker did, and a variant with
``start_from=production`` continues that adapter; without it (or before any adapter served) from the base.

Run (after ``python bench/loop.py --preference concise --edit-rate 0 --rounds 2``):
``python bench/rl_replay.py --variant lr1e3:learning_rate=0.001 iter2:rl_iterations=2`` (minutes per variant).
A variant may train another algorithm on the same round, e.g. rejection sampling:
``bok:algorithm=sft,best_of_k=4`` samples 4 answers to each of the newest 32 training prompts users gave no edit
or approved answer, keeps the judge's favourite finished one per prompt when it clears the worker's bar
(worker/sampling.py, as the worker does; ``bar=targets`` the median score of users' targets, ``bar=none`` every pick)
and trains SFT on them; ``prompts=N`` samples the newest N such prompts instead.
Writes JSON to bench/results/rl-replay-<UTC timestamp>.json (or --out).
"""

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
from prompts import load_prompts, split  # bench/prompts.py, bench/users.py, bench/serve.py: siblings
from serve import format_table
from users import PREFERENCES, make_user, neutral_checks, words

from service.settings import Settings
from worker.checks import with_relevance
from worker.data import build_training_data
from worker.reward import RewardModel
from worker.sampling import (
    MIN_SFT_ROWS,
    generate,
    judged_picks,
    load_sampler,
    pick_bar,
    pick_rows,
    prompts_to_sample,
    targets_bar,
)
from worker.train import TrainConfig, train_adapter, user_targets

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PICKS: dict[tuple, list] = {}  # judged picks per (k, seed, prompts): variants differing only in the bar share them


def parse_variant(text: str) -> tuple[str, dict]:
    """``name:key=value,key=value`` (values as JSON, else strings) -> (name, TrainConfig overrides)."""
    def value(text: str):
        try:
            return json.loads(text)
        except ValueError:
            return text

    name, _, sets = text.partition(":")
    return name, {k: value(v) for k, v in (s.split("=", 1) for s in sets.split(",") if s)}


def replay(name: str, overrides: dict, data, judge, args, heldout: list[str], production: str | None) -> dict:
    from peft import PeftModel

    from service.engine.weights import load_pretrained

    out = RESULTS_DIR / "rl-replay" / name
    started = time.perf_counter()
    progress: list[dict] = []
    steps = {"max_steps": args.max_steps} if args.max_steps else {}
    config = {"algorithm": "rl", **steps, **overrides}
    k = config.pop("best_of_k", 0)  # the worker's FLYWHEEL_BEST_OF_K: the judge's picks of k samples become SFT rows
    bar_rule = config.pop("bar", "worker")  # the bar a pick must clear (worker/sampling.py): worker, targets, none
    # Picks fill SFT up to min_rows, and none are sampled once users' targets reach it (the worker's rule): a variant
    # that samples beside more targets raises it, e.g. min_rows=28 beside 27.
    min_rows = config.pop("min_rows", MIN_SFT_ROWS)
    best_of_prompts = config.pop("prompts", args.best_of_prompts)  # the worker's FLYWHEEL_BEST_OF_PROMPTS
    model, tokenizer = load_sampler(args.base_model, production)  # the worker samples best-of-k from what serves
    data.best_of_k, selected = [], {}  # not an earlier variant's picks
    targets = user_targets(TrainConfig(**config), data)
    prompts = prompts_to_sample(data, best_of_prompts, targets, min_rows)
    if k > 1 and prompts:
        key = (k, config.get("seed", 0), json.dumps(prompts))
        if key not in PICKS:  # sampling is most of a variant's time, and the same for every bar
            PICKS[key] = judged_picks(model, tokenizer, judge, prompts, k=k, max_new_tokens=args.max_tokens,
                                      seed=config.get("seed", 0))[0]
        bar = {"worker": lambda: pick_bar(judge, targets, data.kto.train),
               "targets": lambda: targets_bar(judge, targets), "none": lambda: None}[bar_rule]()
        data.best_of_k, selected = pick_rows(PICKS[key], bar, targets=len(targets), min_rows=min_rows)
    result = train_adapter(TrainConfig(**config), data, args.base_model, out, on_progress=progress.append,
                           parent_adapter=production, judge=judge)
    seconds = time.perf_counter() - started
    model = PeftModel.from_pretrained(load_pretrained(args.base_model, device="cpu")[0], str(out)).eval()
    answers = [a[0] for a in generate(model, tokenizer, [[{"role": "user", "content": q}] for q in heldout],
                                      max_new_tokens=args.max_tokens)]
    user = make_user(args.preference, 0.0, seed=0)
    checks = [neutral_checks(q, a.text, a.finished) for q, a in zip(heldout, answers, strict=True)]
    with model.disable_adapter():  # on topic as the gate and bench/loop.py read it
        checks = with_relevance(model, tokenizer, heldout, [a.text for a in answers], checks)
    return {"name": name, "overrides": overrides, "train_s": seconds, "steps": result.stages[0]["steps"],
            "targets": len(targets), "best_of_k": selected,
            "rows": result.stages[0]["rows"], "target_words": mean_words(targets),
            "pick_words": mean_words(data.best_of_k),
            "approval": sum(user.approves(q, a.text) for q, a in zip(heldout, answers, strict=True)) / len(heldout),
            "mean_words": sum(len(words(a.text)) for a in answers) / len(answers),
            "neutral": {k: sum(c[k] for c in checks) / len(checks) for k in checks[0]},
            "reward_per_step": [p["reward"] for p in progress if "reward" in p]}


def mean_words(rows: list[dict]) -> float | None:
    """Mean words of SFT rows' answers: how long what the adapter imitates is."""
    return sum(len(words(r["messages"][-1]["content"])) for r in rows) / len(rows) if rows else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", nargs="*", default=[], help="name:key=value,... (TrainConfig fields, and "
                        "best_of_k=K: sample K answers per prompt first, the judge's favourite an SFT row; "
                        "prompts=N: that many prompts)")
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/flywheel_loop_bench")
    parser.add_argument("--reward-dir", type=Path, default=RESULTS_DIR / "loop-data" / "reward")
    parser.add_argument("--baseline", default="algorithm=rl", help="key=value,... of the baseline (default: rl)")
    parser.add_argument("--max-steps", type=int, help="steps for every variant, the baseline too (a quick check)")
    parser.add_argument("--preference", choices=sorted(PREFERENCES), default="concise")
    parser.add_argument("--heldout", type=int, default=48)
    parser.add_argument("--run", type=int, help="replay this training run of the bench's database: the votes it "
                        "saw and its judge (default: all votes and the newest judge)")
    parser.add_argument("--best-of-prompts", type=int, default=32, help="prompts a best_of_k variant samples")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    settings = Settings.from_env({})  # defaults: the model `flywheel model fetch-default` provisions
    args.base_model, training = settings.base_model, settings.training

    async def load():
        conn = await asyncpg.connect(args.database_url)
        try:
            run = await conn.fetchrow("SELECT data_until, started_at, metrics->'reward_model'->>'version' AS judge "
                                      "FROM training_runs WHERE id = $1", args.run) if args.run else None
            if args.run and (run is None or run["judge"] is None):
                raise SystemExit(f"training run {args.run} is not in {args.database_url} or trained no judge")
            data = await build_training_data(conn, training.heldout_fraction, training.max_owner_share,
                                             until=run and run["data_until"])
            production = run and await conn.fetchval(  # the version whose last event before the run promoted it
                "SELECT a.path FROM (SELECT DISTINCT ON (version) version, to_status FROM adapter_events "
                "WHERE at < $1 ORDER BY version, at DESC, id DESC) e JOIN adapters a USING (version) "
                "WHERE e.to_status = 'production'", run["started_at"])
            return data, run and int(run["judge"]), production
        finally:
            await conn.close()

    data, judge_version, production = asyncio.run(load())
    judge = RewardModel(args.reward_dir / str(judge_version), args.base_model) if judge_version else \
        RewardModel.latest(args.reward_dir, args.base_model)
    variants = [parse_variant(f"baseline:{args.baseline}"), *map(parse_variant, args.variant)]
    needs_judge = [name for name, sets in variants if sets.get("algorithm", "rl") == "rl"
                   or sets.get("best_of_k", 0) > 1]
    if judge is None and needs_judge:
        raise SystemExit(f"{', '.join(needs_judge)} need a reward model and there is none under {args.reward_dir} "
                         "(the round had too few pairs, or bench/loop.py has not run)")
    heldout = [p.text for p in split(load_prompts())["heldout"]][: args.heldout]
    print(f"production when the run started: {production or 'the base'}", file=sys.stderr)
    runs = [replay(name, sets, data, judge, args, heldout, production)
            for name, sets in variants]
    base = runs[0]
    rows = [[r["name"], r["targets"], r["best_of_k"].get("bar"), r["best_of_k"].get("above_bar"), r["rows"],
             r["steps"], r["train_s"], r["train_s"] / base["train_s"], r["approval"], r["approval"] - base["approval"],
             r["target_words"], r["pick_words"], r["mean_words"], r["neutral"]["on_topic"], r["neutral"]["not_looping"],
             r["neutral"]["finished"]]
            for r in runs]
    print(format_table(["variant", "targets", "bar", "above bar", "rows", "steps", "train s", "x time", "approval",
                        "vs base", "target words", "pick words", "words", "on topic", "not looping", "finished"], rows))
    out = args.out or RESULTS_DIR / f"rl-replay-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"judge_version": judge and judge.version,
                               "judge_heldout_accuracy": judge and judge.heldout_accuracy,
                               "counts": data.counts(), "heldout_prompts": len(heldout), "runs": runs}, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
