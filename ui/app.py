"""The Gradio UI: a client of the REST API (httpx), like any app; it imports nothing that serves or trains.

A person signs in with an API key; the key is kept in Gradio's per-session state (on the UI server, for that
browser tab only), sent to the API as a Bearer header and never logged. The Chat tab is for everyone; the Operator
tab appears for operator and admin keys. The UI works against any Flywheel URL (FLYWHEEL_API_URL).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from ui.client import ApiError, FlywheelClient, Session
from ui.thread import Thread

if TYPE_CHECKING:
    import gradio as gr

if importlib.util.find_spec("gradio") is None:  # `flywheel ui` turns this into "install the `ui` extra"
    raise ImportError("No module named 'gradio'")


def api_status(api_url: str) -> str:
    try:
        response = httpx.get(f"{api_url}/ready", timeout=3)
    except httpx.HTTPError as exc:
        return f"API at {api_url} does not answer ({type(exc).__name__})."
    checks = ", ".join(f"{k}: {v}" for k, v in response.json().get("checks", {}).items())
    return f"API at {api_url}: {response.json().get('status')} ({checks})"


def build_app(api_url: str, export_dir: Path) -> gr.Blocks:
    # Gradio reads GRADIO_TEMP_DIR when imported, so it is imported here, after launch() has set it.
    import gradio as gr

    from ui.chat import ChatTab
    from ui.operator import OperatorTab

    with gr.Blocks(title="Flywheel", analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown("# Flywheel\nA chat service whose model learns from your feedback.")
        status = gr.Markdown(elem_id="api-status")
        with gr.Row():
            key = gr.Textbox(label="API key", type="password", placeholder="fw-...", elem_id="api-key", scale=4)
            sign_in = gr.Button("Sign in", variant="primary", elem_id="sign-in")
            sign_out = gr.Button("Sign out", elem_id="sign-out")
        who = gr.Markdown("Not signed in.", elem_id="signed-in")
        with gr.Tabs():
            with gr.Tab("Chat", elem_id="chat-tab"):
                chat = ChatTab(api_url, session)
                chat.build()
            with gr.Tab("Operator", visible=False, elem_id="operator-tab") as operator_tab:
                operator = OperatorTab(api_url, session, export_dir)
                operator.build()

        outputs = [session, key, who, operator_tab, operator.timer, *chat.outputs, *operator.tables]

        async def enter(typed: str):
            """Check the key with the API; on success keep it in the session, clear the box, show what it may use."""
            if not typed.strip():
                return {who: "**Error:** paste an API key (create one with `flywheel keys create`)."}
            try:
                me = await FlywheelClient(api_url, typed.strip()).me()
            except ApiError as exc:
                return {who: f"**Error:** {exc}"}
            signed_in = Session(typed.strip(), me)
            out = {session: signed_in, key: "", who: f"Signed in as **{me.name}** ({me.role}).",
                   operator_tab: gr.update(visible=me.is_operator), operator.timer: gr.Timer(active=me.is_operator),
                   **chat.view(Thread())}
            try:
                out[chat.conversations] = await chat.conversation_choices(signed_in)
            except ApiError as exc:
                out[chat.notice] = f"**Error:** {exc}"
            if me.is_operator:
                out.update(await operator.refresh(signed_in, None, None))
            return out

        def leave():
            return {session: None, who: "Not signed in.", operator_tab: gr.update(visible=False),
                    operator.timer: gr.Timer(active=False), **chat.view(Thread()),
                    chat.conversations: gr.update(choices=[], value=None)}

        operator_tab.select(operator.refresh, [session, operator.version, operator.run], operator.tables)
        sign_in.click(enter, key, outputs)
        key.submit(enter, key, outputs)
        sign_out.click(leave, None, outputs)
        demo.load(lambda: api_status(api_url), outputs=status)
    # Handlers wait on the API, not on this process's CPU; Gradio's default of one run per event at a time across
    # all sessions would make every user wait for everyone else's reply to finish streaming.
    return demo.queue(default_concurrency_limit=None)


def launch(api_url: str, host: str, port: int, temp_dir: str) -> None:
    # Gradio phones home and writes to /tmp unless told otherwise: keep it local and inside our data dir.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = temp_dir
    export_dir = Path(temp_dir) / "exports"
    build_app(api_url, export_dir).launch(server_name=host, server_port=port, quiet=True,
                                          allowed_paths=[str(export_dir)])
