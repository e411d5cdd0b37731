"""`flywheel up` on a machine without PostgreSQL or Redis: everything embedded, healthy, and stopped by Ctrl-C."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from service.embedded import free_port

pytestmark = pytest.mark.slow


def test_up_runs_everything_embedded_and_stops_cleanly_on_ctrl_c(default_model, model_dir, shared_tmp):
    api_port, ui_port = free_port(), free_port()
    data_dir = shared_tmp / "up"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLYWHEEL_")}
    env.update(FLYWHEEL_DATA_DIR=str(data_dir), FLYWHEEL_MODEL_DIR=str(model_dir), FLYWHEEL_PORT=str(api_port),
               FLYWHEEL_UI_PORT=str(ui_port), FLYWHEEL_TRAIN_POLL_S="1")
    process = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--embedded", "always"], env=env,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("Flywheel is up" in line for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        api = f"http://127.0.0.1:{api_port}"
        assert httpx.get(f"{api}/health").json() == {"status": "ok"}
        checks = httpx.get(f"{api}/ready").json()["checks"]
        assert checks == {"database": "ok", "redis": "ok", "engine": "ok", "adapters": "ok"}
        assert "Admin API key" in "".join(lines)
        page = httpx.get(f"http://127.0.0.1:{ui_port}/")
        assert page.status_code == 200 and "gradio" in page.text.lower()
        assert (data_dir / "postgres" / "postmaster.pid").exists()
    finally:
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=90)
        reader.join(timeout=5)
    output = "".join(lines)
    assert status == 0, output
    assert "Traceback" not in output
    assert not (data_dir / "postgres" / "postmaster.pid").exists()  # the embedded PostgreSQL was stopped
    for port in (api_port, ui_port):
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
