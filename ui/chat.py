"""The Chat tab: conversations, replies streamed token by token, and feedback on each reply.

Every action goes through the REST API as the signed-in key. Feedback controls act on the selected reply (the
newest by default; clicking a reply in the chat selects it). A failed call shows a sentence, never a traceback,
and the message box keeps its text until the reply has arrived.
"""

from __future__ import annotations

import gradio as gr

from ui.client import ApiError, FlywheelClient, Session
from ui.thread import Thread, model_label

SIGN_IN_FIRST = "Sign in with your API key first (top of the page)."


def _error(text: str) -> str:
    return f"**Error:** {text}"


def _tags(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _sampling(temperature: float | None, seed: float | None, regenerate: bool = False) -> dict:
    """The request's sampling fields from the Sampling panel. A seed makes a reply repeatable, so Regenerate, which
    asks for another answer, leaves it out."""
    fields = {} if temperature is None else {"temperature": float(temperature)}
    return fields if seed is None or regenerate else {**fields, "seed": int(seed)}


def _fw(event: dict) -> tuple[dict, str]:
    """(Flywheel's ids for the reply, the text this event adds)."""
    choices = event.get("choices") or [{}]
    return event["flywheel"], (choices[0].get("delta") or {}).get("content") or ""


class ChatTab:
    def __init__(self, api_url: str, session: gr.State):
        self.api_url, self.session = api_url, session

    def client(self, session: Session) -> FlywheelClient:
        return FlywheelClient(self.api_url, session.key)

    def build(self) -> None:
        self.thread = gr.State(Thread())
        with gr.Row():
            with gr.Column(scale=1, min_width=220):
                self.conversations = gr.Dropdown(label="Conversations", choices=[], elem_id="conversations")
                with gr.Row():
                    new = gr.Button("New", elem_id="new-conversation", size="sm")
                    delete = gr.Button("Delete", elem_id="delete-conversation", size="sm", variant="stop")
            with gr.Column(scale=4):
                self.chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", height=420, feedback_options=None,
                                          buttons=["copy", "copy_all"])
                with gr.Row():
                    self.message = gr.Textbox(placeholder="Write a message", show_label=False, elem_id="message",
                                              scale=5, lines=2)
                    send = gr.Button("Send", elem_id="send", variant="primary", scale=1)
                with gr.Accordion("Sampling", open=False, elem_id="sampling"), gr.Row():
                    self.temperature = gr.Slider(0, 2, value=1.0, step=0.05, label="Temperature (0: greedy)",
                                                 elem_id="temperature")
                    self.seed = gr.Number(label="Seed (empty: random)", precision=0, elem_id="seed")
                self.notice = gr.Markdown(elem_id="chat-notice")
                with gr.Group(visible=False, elem_id="feedback-panel") as self.panel:
                    self.target = gr.Markdown(elem_id="feedback-target", padding=True)
                    with gr.Row():
                        self.thumb_up = gr.Button("Thumbs up", elem_id="thumb-up", size="sm")
                        self.thumb_down = gr.Button("Thumbs down", elem_id="thumb-down", size="sm")
                        edit = gr.Button("Edit", elem_id="edit", size="sm")
                        regenerate = gr.Button("Regenerate", elem_id="regenerate", size="sm")
                    with gr.Row(equal_height=True):
                        self.rating = gr.Radio(["1", "2", "3", "4", "5"], label="Rating", elem_id="rating", scale=2)
                        self.comment = gr.Textbox(label="Comment (optional)", elem_id="feedback-comment", scale=3)
                        self.tags = gr.Textbox(label="Tags, comma separated", elem_id="feedback-tags", scale=2)
                        save_comment = gr.Button("Save comment", elem_id="save-comment", size="sm", scale=1)
                with gr.Group(visible=False, elem_id="editor") as self.editor:
                    self.edit_text = gr.Textbox(label="Correct the answer", lines=4, elem_id="edit-text")
                    with gr.Row():
                        save_edit = gr.Button("Save correction", elem_id="save-edit", variant="primary", size="sm")
                        cancel_edit = gr.Button("Cancel", elem_id="cancel-edit", size="sm")
                with gr.Row(visible=False, elem_id="comparison") as self.comparison:
                    with gr.Column():
                        self.answer_a = gr.Markdown(elem_id="answer-a")
                        prefer_a = gr.Button("This one is better", elem_id="prefer-a", size="sm")
                    with gr.Column():
                        self.answer_b = gr.Markdown(elem_id="answer-b")
                        prefer_b = gr.Button("This one is better", elem_id="prefer-b", size="sm")

        self.outputs = [self.thread, self.chatbot, self.notice, self.panel, self.target, self.thumb_up,
                        self.thumb_down, self.rating, self.comment, self.tags, self.editor, self.edit_text,
                        self.comparison, self.answer_a, self.answer_b, self.message, self.conversations]
        state, sampling = [self.session, self.thread], [self.temperature, self.seed]
        send.click(self.send, [*state, self.message, *sampling], self.outputs)
        self.message.submit(self.send, [*state, self.message, *sampling], self.outputs)
        new.click(lambda: self.view(Thread()), None, self.outputs)
        self.chatbot.clear(lambda: self.view(Thread()), None, self.outputs)  # its trash icon: a fresh chat
        delete.click(self.delete, state, self.outputs)
        self.conversations.input(self.open, [*state, self.conversations], self.outputs)
        self.chatbot.select(self.select, state, self.outputs)
        self.thumb_up.click(self.thumb(1), [*state, self.comment, self.tags], self.outputs)
        self.thumb_down.click(self.thumb(-1), [*state, self.comment, self.tags], self.outputs)
        save_comment.click(self.save_comment, [*state, self.comment, self.tags], self.outputs)
        self.rating.input(self.rate, [*state, self.rating], self.outputs)
        edit.click(self.open_editor, state, self.outputs)
        cancel_edit.click(self.close_editor, state, self.outputs)
        save_edit.click(self.save_edit, [*state, self.edit_text], self.outputs)
        regenerate.click(self.regenerate, [*state, *sampling], self.outputs)
        prefer_a.click(self.prefer(0), state, self.outputs)
        prefer_b.click(self.prefer(1), state, self.outputs)

    # --- what the tab shows -------------------------------------------------------------------------------------
    def view(self, thread: Thread, notice: str = "", pending: list[dict] | None = None) -> dict:
        """Every output that follows from ``thread``; handlers add the few they change themselves."""
        selected = thread.messages.get(thread.selected) if thread.selected else None
        thumb = thread.feedback.get("thumb", {})
        rating = thread.feedback.get("rating")
        pair = [thread.messages[i] for i in thread.pair] if thread.pair else []
        return {
            self.thread: thread, self.chatbot: thread.chatbot(pending), self.notice: notice,
            self.panel: gr.update(visible=selected is not None),
            self.target: (f"**Selected reply** ({model_label(selected)}): your feedback: {thread.feedback_summary()}."
                          " Click another reply in the chat to rate that one.") if selected else "",
            self.thumb_up: gr.update(variant="primary" if thumb.get("value") == 1 else "secondary"),
            self.thumb_down: gr.update(variant="primary" if thumb.get("value") == -1 else "secondary"),
            self.rating: str(rating["value"]) if rating else None,
            self.comment: thumb.get("comment") or "", self.tags: ", ".join(thumb.get("tags") or []),
            self.editor: gr.update(visible=thread.editing),
            self.comparison: gr.update(visible=bool(pair)),
            self.answer_a: f"**Answer A** ({model_label(pair[0])})\n\n{pair[0]['content']}" if pair else "",
            self.answer_b: f"**Answer B** ({model_label(pair[1])})\n\n{pair[1]['content']}" if pair else "",
        }

    async def conversation_choices(self, session: Session, value: str | None = None) -> dict:
        rows = await self.client(session).conversations()
        choices = [(f"{r['title'] or '(untitled)'} · {str(r['created_at'])[:16].replace('T', ' ')}", str(r["id"]))
                   for r in rows]
        return gr.update(choices=choices, value=value)

    # --- conversations ------------------------------------------------------------------------------------------
    async def open(self, session: Session | None, thread: Thread, conversation_id: str | None):
        if session is None or not conversation_id:
            return self.view(thread, _error(SIGN_IN_FIRST) if session is None else "")
        try:
            thread = Thread.load(await self.client(session).conversation(conversation_id))
            if thread.selected:
                thread.feedback = await self._feedback(session, thread.selected)
        except ApiError as exc:
            return self.view(thread, _error(str(exc)))
        return self.view(thread)

    async def delete(self, session: Session | None, thread: Thread):
        if session is None or thread.conversation_id is None:
            return self.view(thread, _error(SIGN_IN_FIRST if session is None else "Open a conversation to delete."))
        try:
            await self.client(session).delete_conversation(thread.conversation_id)
            choices = await self.conversation_choices(session)
        except ApiError as exc:
            return self.view(thread, _error(str(exc)))
        return {**self.view(Thread(), "Conversation deleted."), self.conversations: choices}

    async def send(self, session: Session | None, thread: Thread, text: str, temperature: float | None = None,
                   seed: float | None = None):
        """Post the message and stream the reply into the chat; the box is cleared only once the reply is in."""
        if session is None or not text.strip():
            yield self.view(thread, _error(SIGN_IN_FIRST) if session is None else "Write a message first.")
            return
        client, new_conversation = self.client(session), thread.conversation_id is None
        user, reply, meta = {"role": "user", "content": text}, "", None
        try:
            if new_conversation:
                thread.conversation_id = str((await client.create_conversation(text.strip()[:60]))["id"])
            async for event in client.send(thread.conversation_id, text, thread.head, _sampling(temperature, seed)):
                meta, delta = _fw(event)
                reply += delta
                yield self.view(thread, "", [user, {"role": "assistant", "content": reply + " ▌"}])
            if meta is None:
                raise ApiError("The service closed the reply before it began. Try again.")
            thread.add(meta["parent_id"], thread.head, "user", text)
            thread.add(meta["message_id"], meta["parent_id"], "assistant", reply, meta["adapter_version"])
            thread.head, thread.pair = meta["message_id"], None
            thread.select(meta["message_id"])
            out = {**self.view(thread), self.message: ""}
            if new_conversation:
                out[self.conversations] = await self.conversation_choices(session, thread.conversation_id)
            yield out
        except ApiError as exc:
            if new_conversation and meta is None:
                thread.conversation_id = None  # nothing was said in it; the next try starts it again
            yield self.view(thread, _error(str(exc)))

    # --- feedback on the selected reply -------------------------------------------------------------------------
    async def _feedback(self, session: Session, message_id: str) -> dict[str, dict]:
        return {row["kind"]: row for row in await self.client(session).feedback(message_id)}

    async def select(self, session: Session | None, thread: Thread, event: gr.SelectData):
        shown = thread.shown()
        index = event.index if isinstance(event.index, int) else event.index[0]
        if session is None or index >= len(shown) or shown[index]["role"] != "assistant":
            return self.view(thread)
        thread.select(shown[index]["id"])
        try:
            thread.feedback = await self._feedback(session, thread.selected)
        except ApiError as exc:
            return self.view(thread, _error(str(exc)))
        return self.view(thread)

    async def _put(self, session: Session | None, thread: Thread, body: dict | None,
                   retract: str | None = None) -> str | None:
        """Send (or retract) one piece of feedback on the selected reply and reload what the API now holds.

        None when it worked, else the error to show.
        """
        if session is None or thread.selected is None:
            return SIGN_IN_FIRST if session is None else "Select a reply first."
        client = self.client(session)
        try:
            if retract:
                await client.retract_feedback(thread.selected, retract)
            else:
                await client.put_feedback(thread.selected, body)
            thread.feedback = await self._feedback(session, thread.selected)
        except ApiError as exc:
            return str(exc)
        return None

    async def _say(self, session, thread: Thread, body: dict | None, done: str, retract: str | None = None) -> dict:
        error = await self._put(session, thread, body, retract)
        return self.view(thread, _error(error) if error else done)

    def thumb(self, value: int):
        async def handler(session, thread: Thread, comment: str, tags: str):
            if thread.feedback.get("thumb", {}).get("value") == value:  # pressing it again takes it back
                return await self._say(session, thread, None, "Thumb taken back.", retract="thumb")
            body = {"kind": "thumb", "value": value, "comment": comment.strip() or None, "tags": _tags(tags)}
            return await self._say(session, thread, body, "Thanks: thumb recorded.")
        return handler

    async def save_comment(self, session, thread: Thread, comment: str, tags: str):
        thumb = thread.feedback.get("thumb")
        if thumb is None:
            return self.view(thread, _error("Give a thumb up or down first: the comment and tags go with it."))
        body = {"kind": "thumb", "value": thumb["value"], "comment": comment.strip() or None, "tags": _tags(tags)}
        return await self._say(session, thread, body, "Comment saved.")

    async def rate(self, session, thread: Thread, rating: str | None):
        if rating is None:
            return self.view(thread)
        return await self._say(session, thread, {"kind": "rating", "value": int(rating)}, f"Rated {rating}/5.")

    def open_editor(self, session, thread: Thread):
        if thread.selected is None:
            return self.view(thread, _error("Select a reply first."))
        thread.editing = True
        corrected = thread.feedback.get("edit", {}).get("content")
        return {**self.view(thread), self.edit_text: corrected or thread.messages[thread.selected]["content"]}

    def close_editor(self, session, thread: Thread):
        thread.editing = False
        return self.view(thread)

    async def save_edit(self, session, thread: Thread, content: str):
        error = await self._put(session, thread, {"kind": "edit", "content": content})
        thread.editing = bool(error)  # a refused edit stays open, so the correction is not lost
        return self.view(thread, _error(error) if error else "Correction saved: the model will learn from it.")

    async def regenerate(self, session: Session | None, thread: Thread, temperature: float | None = None,
                         seed: float | None = None):
        """Stream a second answer to the same message beside the selected one, to pick the better."""
        if session is None or thread.selected is None:
            yield self.view(thread, _error(SIGN_IN_FIRST if session is None else "Select a reply first."))
            return
        old, text, meta = thread.messages[thread.selected], "", None
        try:
            async for event in self.client(session).regenerate(old["id"], _sampling(temperature, seed, True)):
                meta, delta = _fw(event)
                text += delta
                yield {**self.view(thread), self.comparison: gr.update(visible=True),
                       self.answer_a: f"**Answer A** ({model_label(old)})\n\n{old['content']}",
                       self.answer_b: f"**Answer B** (writing…)\n\n{text}"}
            if meta is None:
                raise ApiError("The service closed the reply before it began. Try again.")
        except ApiError as exc:
            yield self.view(thread, _error(str(exc)))
            return
        thread.add(meta["message_id"], old["parent_id"], "assistant", text, meta["adapter_version"])
        thread.pair = (old["id"], meta["message_id"])
        yield self.view(thread, "Which answer is better? Your pick teaches the model.")

    def prefer(self, which: int):
        async def handler(session, thread: Thread):
            if thread.pair is None:
                return self.view(thread, _error("Regenerate a reply first, then pick the better answer."))
            chosen = thread.pair[which]
            thread.select(chosen)
            error = await self._put(session, thread, {"kind": "comparison", "preferred_message_id": chosen})
            if error:
                return self.view(thread, _error(error))
            if chosen not in {m["id"] for m in thread.path()}:
                thread.head = chosen  # the chosen answer carries the conversation on from here
            thread.pair = None
            return self.view(thread, f"Saved: answer {'AB'[which]} is better.")
        return handler
