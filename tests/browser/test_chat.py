"""A user in the browser: sign in, chat with a streamed reply, give every kind of feedback, and see errors
explained; each piece of feedback must land in Postgres as the API stores it."""

from __future__ import annotations

import json
import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import query, sign_in

pytestmark = pytest.mark.slow
SEED = 7
REPLY = 90_000  # ms: a reply on a busy 2-core CPU, with the model's first call warming up

# Records every text the newest bot message shows, to prove the reply arrived piece by piece.
WATCH_STREAM = """() => {
    window.botTexts = [];
    const chat = document.querySelector('#chatbot');
    new MutationObserver(() => {
        const bots = chat.querySelectorAll('[data-testid="bot"]');
        if (bots.length) window.botTexts.push(bots[bots.length - 1].innerText);
    }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", text)


def _feedback(service, kind: str) -> list:
    return query(service.database_url, "SELECT f.*, k.name AS who FROM feedback f JOIN api_keys k ON k.id = f.owner "
                                       "WHERE k.name = 'alice' AND f.kind = $1", kind)


def test_a_user_chats_and_gives_feedback(service, page, artifacts):
    key = service.new_key("alice")
    sign_in(page, key, "alice")
    expect(page.locator("#signed-in")).to_contain_text("(user)")
    expect(page.locator("#operator-tab-button")).to_be_hidden()  # users get the chat only
    expect(page.locator("#api-key input")).to_have_value("")  # the key lives in the session, not on screen

    page.evaluate(WATCH_STREAM)
    page.locator("#sampling").get_by_text("Sampling").click()  # a seed: the same reply on every run of this test
    page.locator("#seed input").fill(str(SEED))
    page.locator("#message textarea").fill("Name a color.")
    page.locator("#send").click()
    expect(page.locator("#feedback-target")).to_contain_text("Selected reply (base model)", timeout=REPLY)
    expect(page.locator("#message textarea")).to_have_value("")

    replies = query(service.database_url, "SELECT m.id, m.parent_id, m.content, m.adapter_version, m.sampling "
                                          "FROM messages m "
                                          "JOIN conversations c ON c.id = m.conversation_id JOIN api_keys k ON "
                                          "k.id = c.owner WHERE k.name = 'alice' AND m.role = 'assistant'")
    assert len(replies) == 1 and replies[0]["adapter_version"] is None
    sampling = json.loads(replies[0]["sampling"])
    assert (sampling["seed"], sampling["temperature"]) == (SEED, 1.0)
    reply = replies[0]
    shown = page.locator("#chatbot [data-testid='bot']").last.inner_text()
    first_words = _words(reply["content"])[:4]  # markdown may restyle the rest; the words stay
    assert first_words and _words(shown)[:len(first_words)] == first_words and shown.endswith("base model")
    partial = [t for t in dict.fromkeys(page.evaluate("window.botTexts")) if "▌" in t]
    assert len(partial) >= 2, f"the reply did not stream: {partial}"  # several growing states, then the end
    assert all(len(_words(a)) <= len(_words(b)) for a, b in zip(partial, partial[1:], strict=False))
    expect(page.locator("#conversations input")).to_have_value(re.compile(r"^Name a color\. · "))

    # Thumbs: up with a comment and tags, up again takes it back, then down.
    page.locator("#feedback-comment textarea").fill("clear")
    page.locator("#feedback-tags textarea").fill("concise, short")
    page.locator("#thumb-up").click()
    expect(page.locator("#feedback-target")).to_contain_text("thumbs up")
    [thumb] = _feedback(service, "thumb")
    assert (thumb["message_id"], thumb["value"], thumb["comment"], sorted(thumb["tags"])) == (
        reply["id"], 1, "clear", ["concise", "short"])
    page.locator("#thumb-up").click()
    expect(page.locator("#chat-notice")).to_contain_text("Thumb taken back")
    assert _feedback(service, "thumb")[0]["retracted_at"] is not None
    page.locator("#thumb-down").click()
    expect(page.locator("#feedback-target")).to_contain_text("thumbs down")
    [thumb] = _feedback(service, "thumb")
    assert thumb["value"] == -1 and thumb["retracted_at"] is None

    page.locator("#rating").get_by_text("4").click()
    expect(page.locator("#feedback-target")).to_contain_text("rated 4/5")
    assert [r["value"] for r in _feedback(service, "rating")] == [4]

    page.locator("#edit").click()
    expect(page.locator("#edit-text textarea")).to_have_value(reply["content"])
    page.locator("#edit-text textarea").fill("Blue.")
    page.locator("#save-edit").click()
    expect(page.locator("#chat-notice")).to_contain_text("Correction saved")
    expect(page.locator("#editor")).to_be_hidden()
    assert [(r["message_id"], r["content"]) for r in _feedback(service, "edit")] == [(reply["id"], "Blue.")]
    page.screenshot(path=artifacts / "chat.png", full_page=True)

    page.locator("#regenerate").click()
    expect(page.locator("#chat-notice")).to_contain_text("Which answer is better", timeout=REPLY)
    expect(page.locator("#answer-a")).to_contain_text(_words(reply["content"])[0])
    page.screenshot(path=artifacts / "chat-compare.png", full_page=True)
    page.locator("#prefer-b").click()
    expect(page.locator("#chat-notice")).to_contain_text("answer B is better")
    expect(page.locator("#chatbot")).to_contain_text("answer 2 of 2")  # the chosen answer carries on the chat
    [regenerated] = query(service.database_url, "SELECT id, sampling FROM messages WHERE parent_id = $1 AND "
                                                "id <> $2", reply["parent_id"], reply["id"])
    assert json.loads(regenerated["sampling"])["seed"] is None  # another answer, not the seeded one again
    [comparison] = _feedback(service, "comparison")
    assert (comparison["message_id"], comparison["preferred_message_id"]) == (reply["parent_id"], regenerated["id"])


def test_errors_are_explained_and_the_message_is_kept(service, page):
    page.locator("#api-key input").fill("fw-not-a-key")
    page.locator("#sign-in").click()
    expect(page.locator("#signed-in")).to_contain_text("The API key was refused")

    page.locator("#message textarea").fill("Hello before signing in")
    page.locator("#send").click()
    expect(page.locator("#chat-notice")).to_contain_text("Sign in with your API key first")
    expect(page.locator("#message textarea")).to_have_value("Hello before signing in")

    key = service.new_key("bob")
    sign_in(page, key, "bob")
    [bob] = query(service.database_url, "SELECT id FROM api_keys WHERE name = 'bob'")
    assert service.cli("keys", "revoke", str(bob["id"])).returncode == 0  # the key dies mid-session
    page.locator("#message textarea").fill("A long message I do not want to type twice")
    page.locator("#send").click()
    expect(page.locator("#chat-notice")).to_contain_text("The API key was refused")
    expect(page.locator("#message textarea")).to_have_value("A long message I do not want to type twice")
    expect(page.locator("body")).not_to_contain_text("Traceback")
