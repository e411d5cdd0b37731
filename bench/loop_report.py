"""The learning benchmark's report (bench/loop.py): a table per round, issue #8's targets as PASS/FAIL, a plot.

Kept apart from what drives the rounds: these read only a result's dict, as written to its JSON.
"""

from pathlib import Path

from serve import format_table  # bench/serve.py: a sibling


def table(result: dict) -> str:
    headers = ["round", "approval", "wilson 95%", "words", "on topic", "finished", "votes up", "edits", "stages",
               "round s", "verdict", "changed", "rm win", "rm acc", "rm auc", "cand acc", "prod acc", "kl"]
    rows = []
    for r in result["rounds"]:
        gate = r.get("gate") or {}
        judge = gate.get("reward_model") if isinstance(gate.get("reward_model"), dict) else {}
        interval = f"{r['approval_low']:.2f}-{r['approval_high']:.2f}" if r["approval_low"] is not None else None
        rows.append([r["round"], r["approval"], interval, r["mean_words"], r["neutral"]["on_topic"],
                     r["neutral"]["finished"], f"{r['approved']}/{r['votes']}" if "votes" in r else None,
                     r.get("edits"), r.get("stages"), r.get("trigger_to_serving_s"),
                     r.get("verdict") or ("error" if "error" in r else None), gate.get("changed_share"),
                     gate.get("judge_win_rate"), judge.get("heldout_accuracy"), r.get("reward_vs_user_auc"),
                     gate.get("candidate_accuracy"),
                     gate.get("production_accuracy"), gate.get("kl_from_base")])
    return format_table(headers, rows)


def targets(result: dict) -> list[list]:
    """Issue #8's targets for one (preference, edit rate) pair: [check, value, target, PASS/FAIL]."""
    rounds = result["rounds"]
    start = rounds[0]
    checks = []
    if result["edit_rate"] > 0 and len(rounds) > 1:
        gain = rounds[1]["approval"] - start["approval"]
        checks.append(["approval gain after round 1 (edits)", gain, ">= 0.40", gain >= 0.40])
    if result["edit_rate"] == 0 and len(rounds) > 1:
        gain = max(r["approval"] for r in rounds[1:3]) - start["approval"]
        checks.append(["best approval gain within 2 rounds (thumbs)", gain, ">= 0.20", gain >= 0.20])
    drop = max(start["neutral"][k] - r["neutral"][k] for r in rounds[1:] for k in start["neutral"]) \
        if len(rounds) > 1 else 0.0
    checks.append(["largest neutral-check drop", drop, "<= 0.10", drop <= 0.10])
    slowest = max((r.get("trigger_to_serving_s") or 0 for r in rounds[1:]), default=0.0)
    checks.append(["slowest trigger -> serving (s)", slowest, "< 600", slowest < 600])
    return [[c, v, t, "PASS" if ok else "FAIL"] for c, v, t, ok in checks]


def plot(results: list[dict], path: Path) -> bool:
    """Approval per round, one line per pair, with Wilson intervals; False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for result in results:
        rounds = result["rounds"]
        x = [r["round"] for r in rounds]
        y = [r["approval"] for r in rounds]
        # clamped: JSON written before wilson_interval was exact at 0 holds a low bound of 7e-18 above 0
        low = [max(0.0, r["approval"] - (r["approval_low"] or r["approval"])) for r in rounds]
        high = [max(0.0, (r["approval_high"] or r["approval"]) - r["approval"]) for r in rounds]
        label = f"{result['preference']}, " + (f"edit rate {result['edit_rate']:g}" if result["edit_rate"]
                                               else "thumbs only")
        ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.set(xlabel="round", ylabel="held-out approval (greedy)", ylim=(0, 1), title="Flywheel learning benchmark")
    ax.set_xticks(sorted({r["round"] for res in results for r in res["rounds"]}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
