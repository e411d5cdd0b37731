"""What the Operator tab's tables and charts say, computed from the API's JSON (no network, no Gradio).

Approval is always shown with its Wilson 95% interval and vote count, as the API computes them: a rate from a
handful of votes looks like a result and is not one.
"""

from __future__ import annotations

from ui.charts import Point, Series, line_chart

ADAPTER_COLUMNS = ("version", "name", "status", "algorithm", "parent", "created", "gate", "live approval")
RUN_COLUMNS = ("run", "status", "algorithm", "trigger", "by", "progress", "loss", "started", "finished", "result")
COUNT_COLUMNS = ("model", "replies", "thumbs up", "thumbs down", "approval", "ratings", "mean rating", "edits",
                 "comparisons", "comparison wins")


def _when(value: str | None) -> str:
    return str(value)[:16].replace("T", " ") if value else ""


def _number(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def approval_text(totals: dict | None) -> str:
    """'62% [48%, 75%] of 40 votes', or why there is no rate."""
    if not totals or totals.get("approval") is None:
        return "no votes yet"
    low, high = totals["approval_ci95"]
    votes = totals["thumbs_up"] + totals["thumbs_down"]
    return f"{totals['approval']:.0%} [{low:.0%}, {high:.0%}] of {votes} votes"


def gate_text(metrics: dict | None) -> str:
    """The offline gate's verdict and the numbers it was decided on, in one cell."""
    if not metrics:
        return ""
    parts = []
    if "candidate_accuracy" in metrics:
        parts.append(f"held-out accuracy {metrics['candidate_accuracy']:.2f} vs "
                     f"{metrics.get('production_accuracy', 0):.2f}")
    if "kl_from_base" in metrics:
        parts.append(f"KL {metrics['kl_from_base']:.3f}")
    if "changed_share" in metrics:  # behaviour: greedy answers to held-out and gate prompts against what served
        parts.append(f"changed {metrics['changed_share']:.0%} of {metrics['behaviour_prompts']} answers")
        words = metrics.get("mean_words") or {}
        if words:
            parts.append(f"words {words['production']:.0f} -> {words['candidate']:.0f}")
        for check, label in (("on_topic", "on topic"), ("finished", "finished")):
            if check in metrics["neutral_candidate"]:
                parts.append(f"{label} {metrics['neutral_production'][check]:.0%} -> "
                             f"{metrics['neutral_candidate'][check]:.0%}")
    if metrics.get("judge_win_rate") is not None:
        parts.append(f"reward model v{metrics['judge_version']} prefers it on {metrics['judge_win_rate']:.0%}")
    if "gate_reasons" in metrics:
        reasons = metrics["gate_reasons"]
        parts.append("failed: " + "; ".join(reasons) if reasons else "passed")
    return ", ".join(parts)


def adapter_table(adapters: list[dict], stats: list[dict]) -> dict:
    totals = {s["version"]: s["totals"] for s in stats}
    rows = []
    for a in adapters:
        status = a["status"] + (f" ({a['canary_percent']}%)" if a.get("canary_percent") else "")
        parent = f"v{a['parent_version']}" if a.get("parent_version") else "base"
        rows.append([f"v{a['version']}", a.get("name") or "", status, a.get("algorithm") or "", parent,
                     _when(a.get("created_at")), gate_text(a.get("metrics")), approval_text(totals.get(a["version"]))])
    return {"headers": list(ADAPTER_COLUMNS), "data": rows}


def progress_text(run: dict) -> str:
    progress = run.get("progress") or {}
    if "step" not in progress:
        return ""
    eta = f", about {progress['eta_s']} s left" if run["status"] == "running" and progress.get("eta_s") else ""
    return f"{progress.get('stage', '')} step {progress['step']}/{progress.get('total_steps', '?')}{eta}".strip()


def result_text(run: dict) -> str:
    metrics = run.get("metrics") or {}
    if run.get("error"):
        return run["error"]
    if metrics.get("adapter_version"):
        return f"v{metrics['adapter_version']} {metrics.get('verdict', '')}".strip()
    return metrics.get("note", "")


def last_loss(run: dict) -> float | None:
    """The loss of the last logged step (the trainer's closing report carries none)."""
    losses = [p["loss"] for p in (run.get("progress") or {}).get("history") or [] if "loss" in p]
    return losses[-1] if losses else None


def run_table(runs: list[dict]) -> dict:
    rows = [[r["id"], r["status"], r.get("algorithm") or "", r.get("trigger") or "", r.get("requested_by") or "",
             progress_text(r), _number(last_loss(r)), _when(r.get("started_at")), _when(r.get("finished_at")),
             result_text(r)] for r in runs]
    return {"headers": list(RUN_COLUMNS), "data": rows}


def run_chart(run: dict | None) -> str:
    """Loss and reward margin for every logged step of ``run`` (steps of later stages follow on)."""
    if run is None:
        return line_chart("Training runs", [], empty="no training runs yet")
    history = (run.get("progress") or {}).get("history") or []
    loss = [Point(i + 1, p["loss"]) for i, p in enumerate(history) if "loss" in p]
    margin = [Point(i + 1, p["rewards/margins"]) for i, p in enumerate(history) if "rewards/margins" in p]
    stages = "+".join(dict.fromkeys(p.get("stage", "") for p in history)) or run.get("algorithm") or ""
    title = f"Run {run['id']} ({stages}, {run['status']}): loss and reward margin per step"
    series = [Series("loss", loss)] + ([Series("reward margin", margin)] if margin else [])
    return line_chart(title, series, empty="no steps logged yet")


def approval_chart(stats: list[dict]) -> str:
    """Approval per adapter version and day, each point with its 95% interval."""
    days = sorted({d["day"] for s in stats for d in s["by_day"] if d["approval"] is not None})
    position = {day: float(i) for i, day in enumerate(days)}
    series = [Series(s["model"], [Point(position[d["day"]], d["approval"], *d["approval_ci95"])
                                  for d in s["by_day"] if d["approval"] is not None]) for s in stats]
    series = [s for s in series if s.points]
    return line_chart("Approval (thumbs up share) per version and day, with 95% intervals", series,
                      x_labels={x: day for day, x in position.items()}, y_range=(0.0, 1.0),
                      empty="no thumbs yet")


def count_table(stats: list[dict]) -> dict:
    keys = ("replies", "thumbs_up", "thumbs_down", "ratings", "edits", "comparison_wins")
    rows = []
    for s in stats:
        t = s["totals"]
        rows.append([s["model"], t["replies"], t["thumbs_up"], t["thumbs_down"], approval_text(t), t["ratings"],
                     _number(t["mean_rating"], 2), t["edits"], t["comparisons"], t["comparison_wins"]])
    if len(stats) > 1:
        total = {k: sum(s["totals"][k] for s in stats) for k in keys}
        # A comparison counts once for each answer it compared, but has exactly one winner: count the winners.
        rows.append(["all", total["replies"], total["thumbs_up"], total["thumbs_down"], "", total["ratings"], "",
                     total["edits"], total["comparison_wins"], ""])
    return {"headers": list(COUNT_COLUMNS), "data": rows}
