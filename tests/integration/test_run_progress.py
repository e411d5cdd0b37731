"""A run's progress keeps the latest report and a per-step history of loss and reward margin (what the UI plots)."""

from __future__ import annotations

from service import db
from service.runs import store as runs


async def test_progress_appends_one_point_per_logged_step(database_url):
    pool = await db.create_pool(database_url, 1)
    try:
        run = await runs.queue(pool, algorithm="auto", params={}, requested_by="test")
        await runs.progress(pool, run["id"], {"stage": "sft", "step": 1, "total_steps": 2, "loss": 2.5,
                                              "learning_rate": 1e-4, "eta_s": 3})
        await runs.progress(pool, run["id"], {"stage": "dpo", "step": 1, "total_steps": 2, "loss": 0.69,
                                              "rewards/margins": 0.02})
        await runs.progress(pool, run["id"], {"stage": "dpo", "step": 2, "total_steps": 2, "train_loss": 0.6})
        progress = (await runs.get(pool, run["id"]))["progress"]
        assert progress["step"] == 2 and progress["train_loss"] == 0.6  # the latest report, as before
        assert progress["history"] == [{"stage": "sft", "step": 1, "loss": 2.5},
                                       {"stage": "dpo", "step": 1, "loss": 0.69, "rewards/margins": 0.02}]
    finally:
        await pool.close()
