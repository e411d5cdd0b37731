"""The Operator tab: adapters and their live approval, registry actions, training runs, feedback stats, export.

Shown to operator and admin keys only, and the API checks the role on every call anyway. Each registry action
is reviewed before it runs (what will happen, and a reason for the audit log). What the tables and charts say is
shaped in ``ui.figures``; this module lays out the tab and calls the API.
"""

from __future__ import annotations

import asyncio
import time
import typing
from pathlib import Path

import gradio as gr

from ui import figures
from ui.client import ApiError, FlywheelClient, Session
from worker.train import Algorithm

ACTIONS = ("promote", "canary", "rollback", "retire", "reject")
ALGORITHMS = typing.get_args(Algorithm)
WHAT_IT_DOES = {
    "promote": "make {v} production (the current production version is retired)",
    "canary": "send {percent}% of callers to {v} as a canary",
    "rollback": "roll back: the previous production version (or the base model) serves again",
    "retire": "retire {v}",
    "reject": "reject {v} (it can never serve)",
}


def _error(text: str) -> str:
    return f"**Error:** {text}"


class OperatorTab:
    def __init__(self, api_url: str, session: gr.State, export_dir: Path):
        self.api_url, self.session, self.export_dir = api_url, session, export_dir

    def build(self) -> None:
        self.pending = gr.State(None)  # the reviewed action awaiting confirmation
        self.notice = gr.Markdown(elem_id="operator-notice")
        refresh = gr.Button("Refresh", elem_id="operator-refresh", size="sm")
        gr.Markdown("### Adapters")
        self.adapters = gr.Dataframe(headers=list(figures.ADAPTER_COLUMNS), interactive=False, wrap=True,
                                     elem_id="adapters-table")
        with gr.Row():
            self.version = gr.Dropdown(label="Adapter", choices=[], elem_id="adapter-version")
            self.action = gr.Dropdown(list(ACTIONS), value="promote", label="Action", elem_id="adapter-action")
            self.percent = gr.Slider(1, 50, value=10, step=1, label="Canary percent", elem_id="canary-percent")
            self.reason = gr.Textbox(label="Reason (kept in the audit log)", elem_id="adapter-reason")
            review = gr.Button("Review", elem_id="adapter-review")
        with gr.Group(visible=False, elem_id="adapter-confirm-box") as self.confirm_box:
            self.confirm_text = gr.Markdown(elem_id="adapter-confirm-text")
            with gr.Row():
                confirm = gr.Button("Confirm", variant="stop", elem_id="adapter-confirm")
                cancel = gr.Button("Cancel", elem_id="adapter-cancel")
        gr.Markdown("### Training runs")
        self.runs = gr.Dataframe(headers=list(figures.RUN_COLUMNS), interactive=False, wrap=True,
                                 elem_id="runs-table")
        with gr.Row():
            self.run = gr.Dropdown(label="Run to plot", choices=[], elem_id="run-select")
            self.algorithm = gr.Dropdown(list(ALGORITHMS), value="auto", label="Algorithm",
                                         elem_id="train-algorithm")
            train = gr.Button("Train now", elem_id="train-now")
        self.run_chart = gr.HTML(elem_id="run-chart")
        gr.Markdown("### Live feedback")
        self.approval_chart = gr.HTML(elem_id="approval-chart")
        self.counts = gr.Dataframe(headers=list(figures.COUNT_COLUMNS), interactive=False, elem_id="feedback-counts")
        gr.Markdown("### Export training data")
        with gr.Row():
            self.export_format = gr.Radio(["sft", "dpo", "kto"], value="dpo", label="Format", elem_id="export-format")
            export = gr.Button("Export", elem_id="export")
            self.export_file = gr.File(label="JSONL", interactive=False, elem_id="export-file")
        self.timer = gr.Timer(5, active=False)  # switched on at an operator's sign-in: live run progress

        self.tables = [self.adapters, self.version, self.runs, self.run, self.run_chart, self.approval_chart,
                       self.counts, self.notice]
        refresh.click(self.refresh, [self.session, self.version, self.run], self.tables)
        self.timer.tick(self.refresh_runs, [self.session, self.run], [self.runs, self.run, self.run_chart])
        self.run.input(self.refresh_runs, [self.session, self.run], [self.runs, self.run, self.run_chart])
        review.click(self.review, [self.session, self.action, self.version, self.percent, self.reason],
                     [self.pending, self.confirm_box, self.confirm_text, self.notice])
        cancel.click(lambda: (None, gr.update(visible=False), "Nothing was changed."), None,
                     [self.pending, self.confirm_box, self.notice])
        confirm.click(self.confirm, [self.session, self.pending, self.version, self.run],
                      [self.pending, self.confirm_box, self.reason, *self.tables])
        train.click(self.train, [self.session, self.algorithm, self.version, self.run], self.tables)
        export.click(self.export, [self.session, self.export_format], [self.export_file, self.notice])

    def client(self, session: Session) -> FlywheelClient:
        return FlywheelClient(self.api_url, session.key)

    # --- reading ------------------------------------------------------------------------------------------------
    async def refresh(self, session: Session | None, version: str | None, run: str | None, notice: str = ""):
        """Every table and chart, from three API calls made together."""
        if session is None or not session.me.is_operator:
            return {self.notice: _error("Sign in with an operator or admin key to use this tab.")}
        client = self.client(session)
        try:
            adapters, stats, runs = await asyncio.gather(client.adapters(), client.stats(), client.runs())
        except ApiError as exc:
            return {self.notice: _error(str(exc))}
        versions = [(f"v{a['version']} ({a['status']})", str(a["version"])) for a in adapters]
        keep = version if version in {v for _, v in versions} else None
        return {self.adapters: figures.adapter_table(adapters, stats),
                self.version: gr.update(choices=versions, value=keep),
                **self._runs_view(runs, run),
                self.approval_chart: figures.approval_chart(stats), self.counts: figures.count_table(stats),
                self.notice: notice}

    def _runs_view(self, runs: list[dict], run: str | None) -> dict:
        ids = [str(r["id"]) for r in runs]
        shown = run if run in ids else (ids[0] if ids else None)
        chosen = next((r for r in runs if str(r["id"]) == shown), None)
        return {self.runs: figures.run_table(runs),
                self.run: gr.update(choices=[(f"run {i}", i) for i in ids], value=shown),
                self.run_chart: figures.run_chart(chosen)}

    async def refresh_runs(self, session: Session | None, run: str | None):
        if session is None or not session.me.is_operator:
            return {}
        try:
            return self._runs_view(await self.client(session).runs(), run)
        except ApiError:
            return {}  # the timer tries again in a few seconds; a button press shows the error

    # --- acting -------------------------------------------------------------------------------------------------
    def review(self, session: Session | None, action: str, version: str | None, percent: float, reason: str):
        """Say what the action will do and ask for confirmation; nothing is sent yet."""
        hidden = gr.update(visible=False)
        if session is None:
            return None, hidden, "", _error("Sign in first.")
        if action != "rollback" and not version:
            return None, hidden, "", _error("Choose an adapter first.")
        if not reason.strip():
            return None, hidden, "", _error("Give a reason: it goes into the audit log with your key's name.")
        pending = {"action": action, "version": int(version) if version and action != "rollback" else None,
                   "percent": int(percent), "reason": reason.strip()}
        what = WHAT_IT_DOES[action].format(v=f"v{version}", percent=int(percent))
        return pending, gr.update(visible=True), f"**Confirm:** {what}. Reason: *{reason.strip()}*", ""

    async def confirm(self, session: Session | None, pending: dict | None, version: str | None, run: str | None):
        hidden = {self.pending: None, self.confirm_box: gr.update(visible=False)}
        if session is None or pending is None:
            return {**hidden, self.notice: _error("Nothing to confirm: review an action first.")}
        try:
            result = await self.client(session).operate(pending["action"], pending["version"], pending["reason"],
                                                        pending["percent"])
        except ApiError as exc:
            return {**hidden, self.notice: _error(str(exc))}
        serving = ", ".join(f"{alias}: {'v' + str(v) if v else 'base model'}"
                            for alias, v in result["serving"].items())
        adapter = result.get("adapter")
        done = f"Done: {pending['action']}" + (f" v{adapter['version']} is now {adapter['status']}" if adapter else "")
        return {**hidden, self.reason: "", **await self.refresh(session, version, run, f"{done}. Serving {serving}.")}

    async def train(self, session: Session | None, algorithm: str, version: str | None, run: str | None):
        if session is None:
            return {self.notice: _error("Sign in first.")}
        try:
            queued = await self.client(session).start_run(algorithm)
        except ApiError as exc:
            return {self.notice: _error(str(exc))}
        return await self.refresh(session, version, str(queued["id"]),
                                  f"Run {queued['id']} ({algorithm}) is queued: the worker starts it shortly.")

    async def export(self, session: Session | None, fmt: str):
        if session is None:
            return None, _error("Sign in first.")
        try:
            content, rows = await self.client(session).export(fmt)
        except ApiError as exc:
            return None, _error(str(exc))
        self.export_dir.mkdir(parents=True, exist_ok=True)
        path = self.export_dir / f"flywheel-{fmt}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        path.write_bytes(content)
        return str(path), f"Exported {rows} {fmt.upper()} rows."
