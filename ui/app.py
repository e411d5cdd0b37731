"""The Gradio UI: a client of the REST API (httpx), like any app; it imports nothing that serves or trains.

For now it shows whether the API answers; the chat and operator tabs come with their features.
"""

from __future__ import annotations

import os

import httpx


def api_status(api_url: str) -> str:
    try:
        response = httpx.get(f"{api_url}/ready", timeout=3)
    except httpx.HTTPError as exc:
        return f"API at {api_url} does not answer: {exc}"
    checks = ", ".join(f"{k}: {v}" for k, v in response.json().get("checks", {}).items())
    return f"API at {api_url}: {response.json().get('status')} ({checks})"


def build_app(api_url: str):
    import gradio as gr

    with gr.Blocks(title="Flywheel", analytics_enabled=False) as demo:
        gr.Markdown("# Flywheel\nA chat service whose model learns from its users.")
        status = gr.Textbox(label="Service status", elem_id="status", interactive=False)
        refresh = gr.Button("Refresh", elem_id="refresh")
        refresh.click(lambda: api_status(api_url), outputs=status)
        demo.load(lambda: api_status(api_url), outputs=status)
    return demo


def launch(api_url: str, host: str, port: int, temp_dir: str) -> None:
    # Gradio phones home and writes to /tmp unless told otherwise: keep it local and inside our data dir.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = temp_dir
    build_app(api_url).launch(server_name=host, server_port=port, quiet=True)
