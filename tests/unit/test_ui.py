"""The UI's pure parts: error sentences, the conversation tree on screen, and what the operator tables say."""

from __future__ import annotations

import httpx

from ui.client import Me, Session, explain
from ui.figures import approval_chart, approval_text, gate_text, run_chart
from ui.thread import Thread


def _problem(status: int, detail: str, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json={"status": status, "detail": detail}, headers=headers)


def test_api_errors_become_sentences_a_user_can_act_on():
    refused = explain(_problem(401, "this API key is unknown or revoked"))
    assert refused.status == 401 and str(refused).startswith("The API key was refused")
    limited = explain(_problem(429, "more than 120 requests this minute for this key", {"Retry-After": "17"}))
    assert "Rate limited" in str(limited) and "17 seconds" in str(limited) and "your text is kept" in str(limited)
    assert "Try again shortly" in str(explain(_problem(503, "engine overloaded")))
    assert str(explain(_problem(400, "content is empty"))) == "content is empty"
    openai_shaped = httpx.Response(400, json={"error": {"message": "unknown model", "code": 400}})
    assert str(explain(openai_shaped)) == "unknown model"


def test_the_key_stays_out_of_a_sessions_repr():
    session = Session("fw-secret-key", Me(3, "alice", "user"))
    assert "fw-secret" not in repr(session) and "alice" in repr(session)
    assert not session.me.is_operator and Me(1, "root", "admin").is_operator


def _conversation() -> Thread:
    """system -> user -> two sibling answers (a regeneration); the newest answer is the head."""
    rows = [{"id": "s", "parent_id": None, "role": "system", "content": "Be brief."},
            {"id": "u", "parent_id": "s", "role": "user", "content": "Hi"},
            {"id": "a1", "parent_id": "u", "role": "assistant", "content": "Hello", "adapter_version": None},
            {"id": "a2", "parent_id": "u", "role": "assistant", "content": "Hey", "adapter_version": 4}]
    return Thread.load({"id": "c", "messages": rows})


def test_the_chat_shows_the_branch_to_the_head_and_labels_each_reply():
    thread = _conversation()
    assert [m["id"] for m in thread.path()] == ["s", "u", "a2"] and thread.selected == "a2"
    assert thread.chatbot() == [{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hey\n\n<sub>flywheel:v4 · answer 2 of 2</sub>"}]
    thread.head = "a1"
    assert thread.chatbot()[-1]["content"].endswith("<sub>base model · answer 1 of 2</sub>")


def test_feedback_summary_says_what_the_user_gave():
    thread = _conversation()
    assert thread.feedback_summary() == "none yet"
    thread.feedback = {"thumb": {"value": -1}, "rating": {"value": 2}, "edit": {"content": "x"},
                       "comparison": {"preferred_message_id": "a1"}}
    assert thread.feedback_summary() == "thumbs down, rated 2/5, corrected, another answer picked as better"


def test_approval_is_never_shown_without_its_interval_and_votes():
    assert approval_text(None) == "no votes yet"
    totals = {"approval": 0.625, "approval_ci95": [0.3, 0.86], "thumbs_up": 5, "thumbs_down": 3}
    assert approval_text(totals) == "62% [30%, 86%] of 8 votes"
    stats = [{"model": "flywheel:v2", "by_day": [
        {"day": "2026-11-26", "approval": 0.5, "approval_ci95": [0.1, 0.9]},
        {"day": "2026-11-27", "approval": None, "approval_ci95": None}]}]
    chart = approval_chart(stats)
    assert "flywheel:v2" in chart and "2026-11-26" in chart and chart.count("<circle") == 1
    assert chart.count('stroke-width="6"') == 1  # the interval whisker


def test_gate_and_run_figures():
    assert gate_text({"candidate_accuracy": 0.71, "production_accuracy": 0.5, "kl_from_base": 0.0123,
                      "gate_reasons": []}) == "held-out accuracy 0.71 vs 0.50, KL 0.012, passed"
    assert gate_text({"gate_reasons": ["drifts"]}) == "failed: drifts"
    behaviour = {"behaviour_prompts": 8, "changed_share": 0.75, "mean_words": {"candidate": 31.2, "production": 80.4},
                 "neutral_candidate": {"on_topic": 0.75, "finished": 0.875},
                 "neutral_production": {"on_topic": 1.0, "finished": 0.5},
                 "judge_version": 2, "judge_win_rate": 0.625, "gate_reasons": []}
    assert gate_text(behaviour) == ("changed 75% of 8 answers, words 80 -> 31, on topic 100% -> 75%, finished 50% -> "
                                    "88%, reward model v2 prefers it on 62%, passed")
    run = {"id": 7, "status": "running", "algorithm": "auto", "progress": {"history": [
        {"stage": "sft", "step": 1, "loss": 2.0}, {"stage": "dpo", "step": 1, "loss": 0.7, "rewards/margins": 0.1}]}}
    chart = run_chart(run)
    assert "Run 7 (sft+dpo, running)" in chart and chart.count("<circle") == 3 and "reward margin" in chart
    assert "no steps logged yet" in run_chart({**run, "progress": {}})
