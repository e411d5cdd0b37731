"""An operator in the browser: the adapters table, a reviewed and confirmed promotion that Postgres records,
training runs with their per-step plot, train now, feedback stats and export."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from playwright.sync_api import expect

from service import db
from service.runs import store as runs
from tests.browser.conftest import ADMIN_KEY, query, sign_in

pytestmark = pytest.mark.slow


def _in_thread(coroutine):
    """Playwright's sync API keeps an event loop running in the test's thread: run asyncpg work in another."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


async def _report(database_url: str, run_id: int | None, *reports: dict) -> int:
    """Report progress the way the worker does (queueing a DPO run first when ``run_id`` is None)."""
    pool = await db.create_pool(database_url, 1)
    try:
        if run_id is None:
            run_id = (await runs.queue(pool, algorithm="dpo", params={}, requested_by="seed"))["id"]
        for report in reports:
            await runs.progress(pool, run_id, {"stage": "dpo", "total_steps": 4, **report})
        return run_id
    finally:
        await pool.close()


def test_an_operator_promotes_a_candidate_and_watches_training(service, page, lora_adapters, artifacts):
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    loaded = httpx.post(f"{service.url}/v1/load_lora_adapter", headers=admin, timeout=120,
                        json={"lora_name": "browser-candidate", "lora_path": str(lora_adapters[0])})
    assert loaded.status_code == 200, loaded.text
    version = loaded.json()["version"]
    # Three steps and the trainer's closing report, which is not a step.
    run_id = _in_thread(_report(service.database_url, None, *(
        {"step": step, "loss": loss, "rewards/margins": margin}
        for step, loss, margin in ((1, 0.69, 0.0), (2, 0.61, 0.2), (3, 0.52, 0.45))), {"step": 3, "train_loss": 0.6}))
    sign_in(page, service.new_key("olivia", "operator"), "olivia")

    page.locator("#operator-tab-button").click()
    table = page.locator("#adapters-table")
    expect(table).to_contain_text(f"v{version}")
    expect(table).to_contain_text("candidate")
    page.locator("#adapter-version input").click()
    page.locator(f"#adapter-version li[aria-label='v{version} (candidate)']").click()
    page.locator("#adapter-reason textarea").fill("looks good in the browser test")
    page.locator("#adapter-review").click()
    expect(page.locator("#adapter-confirm-text")).to_contain_text(f"make v{version} production")
    assert query(service.database_url, "SELECT status FROM adapters WHERE version = $1", version)[0]["status"] \
        == "candidate"  # nothing happens before confirmation
    page.locator("#adapter-confirm").click()
    expect(page.locator("#operator-notice")).to_contain_text(f"v{version} is now production")
    expect(table).to_contain_text("production")
    expect(page.locator("#adapter-confirm-box")).to_be_hidden()
    [event] = query(service.database_url, "SELECT to_status, actor, reason FROM adapter_events WHERE version = $1 "
                                          "ORDER BY id DESC LIMIT 1", version)
    assert dict(event) == {"to_status": "production", "actor": "olivia", "reason": "looks good in the browser test"}
    assert httpx.get(f"{service.url}/ready").json()["serving"]["production"] == version

    # The seeded run is plotted step by step: three points per series, the closing report left out.
    expect(page.locator("#runs-table")).to_contain_text("dpo step 3/4")
    expect(page.locator("#runs-table")).to_contain_text("0.520")  # the last step's loss
    expect(page.locator("#run-select input")).to_have_value(f"run {run_id}")
    chart = page.locator("#run-chart svg")
    expect(chart).to_contain_text("reward margin")
    expect(chart.locator("circle")).to_have_count(6)
    # Live: a new step shows up without a click (the tab polls every few seconds).
    _in_thread(_report(service.database_url, run_id, {"step": 4, "loss": 0.47, "rewards/margins": 0.6}))
    expect(page.locator("#runs-table")).to_contain_text("dpo step 4/4", timeout=15_000)
    expect(chart.locator("circle")).to_have_count(8)

    page.locator("#train-algorithm input").click()
    page.locator("#train-algorithm li[aria-label='kto']").click()
    page.locator("#train-now").click()
    expect(page.locator("#operator-notice")).to_contain_text("(kto) is queued")
    assert [(r["algorithm"], r["status"]) for r in query(
        service.database_url, "SELECT algorithm, status FROM training_runs WHERE requested_by = 'olivia'")] == [
        ("kto", "queued")]

    expect(page.locator("#approval-chart svg")).to_contain_text("Approval")
    expect(page.locator("#feedback-counts")).to_contain_text("thumbs up")
    page.locator("#export").click()
    expect(page.locator("#operator-notice")).to_contain_text("Exported")
    expect(page.locator("#export-file")).to_contain_text("flywheel-dpo-")

    page.locator("#run-select input").click()  # train now showed the new run; go back to the one with steps
    page.locator(f"#run-select li[aria-label='run {run_id}']").click()
    expect(chart.locator("circle")).to_have_count(8)
    page.screenshot(path=artifacts / "operator.png", full_page=True)
