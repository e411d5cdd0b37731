"""One open conversation as the chat tab sees it: a tree of messages, the branch on screen, the reply in focus.

The API keeps regenerated answers as siblings (same parent), so a conversation is a tree. The branch on screen
runs from the root to ``head``, the message the next turn will answer after; picking the better of two answers
moves ``head`` to it. This module turns that into what Gradio's Chatbot shows and holds no network code.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def model_label(message: dict) -> str:
    version = message.get("adapter_version")
    return "base model" if version is None else f"flywheel:v{version}"


@dataclass
class Thread:
    conversation_id: str | None = None
    messages: dict[str, dict] = field(default_factory=dict)  # id -> {id, parent_id, role, content, adapter_version}
    head: str | None = None
    selected: str | None = None  # the assistant reply the feedback controls act on
    feedback: dict[str, dict] = field(default_factory=dict)  # the caller's feedback on ``selected``, by kind
    pair: tuple[str, str] | None = None  # (earlier answer, regenerated answer) shown side by side
    editing: bool = False

    @classmethod
    def load(cls, conversation: dict) -> Thread:
        """The conversation as the API returns it; the newest message is the head, as the API itself assumes."""
        rows = conversation["messages"]
        thread = cls(conversation["id"], {str(m["id"]): _plain(m) for m in rows})
        if rows:
            thread.head = str(rows[-1]["id"])
            replies = [m for m in thread.path() if m["role"] == "assistant"]
            thread.selected = replies[-1]["id"] if replies else None
        return thread

    def add(self, message_id: str, parent_id: str | None, role: str, content: str,
            adapter_version: int | None = None) -> None:
        self.messages[message_id] = {"id": message_id, "parent_id": parent_id, "role": role, "content": content,
                                     "adapter_version": adapter_version}

    def path(self) -> list[dict]:
        """Root to head: the branch on screen, and the context the next turn is answered in."""
        branch, at = [], self.head
        while at is not None:
            message = self.messages[at]
            branch.append(message)
            at = message["parent_id"]
        return branch[::-1]

    def shown(self) -> list[dict]:
        """The messages the Chatbot displays (a system prompt is not part of the chat on screen)."""
        return [m for m in self.path() if m["role"] != "system"]

    def siblings(self, message_id: str) -> list[str]:
        parent = self.messages[message_id]["parent_id"]
        return [m["id"] for m in self.messages.values() if m["parent_id"] == parent and m["role"] == "assistant"]

    def chatbot(self, pending: list[dict] | None = None) -> list[dict]:
        """Gradio Chatbot messages; each reply ends with a small note of the model that wrote it."""
        out = []
        for message in self.shown():
            content = message["content"]
            if message["role"] == "assistant":
                answers = self.siblings(message["id"])
                which = f" · answer {answers.index(message['id']) + 1} of {len(answers)}" if len(answers) > 1 else ""
                content += f"\n\n<sub>{model_label(message)}{which}</sub>"
            out.append({"role": message["role"], "content": content})
        return out + (pending or [])

    def select(self, message_id: str | None) -> None:
        self.selected, self.feedback, self.editing = message_id, {}, False

    def feedback_summary(self) -> str:
        said = []
        if thumb := self.feedback.get("thumb"):
            said.append("thumbs up" if thumb["value"] == 1 else "thumbs down")
        if rating := self.feedback.get("rating"):
            said.append(f"rated {rating['value']}/5")
        if "edit" in self.feedback:
            said.append("corrected")
        if comparison := self.feedback.get("comparison"):
            chosen = comparison["preferred_message_id"] == self.selected
            said.append("picked as the better answer" if chosen else "another answer picked as better")
        return ", ".join(said) or "none yet"


def _plain(message: dict) -> dict:
    parent = message.get("parent_id")
    return {"id": str(message["id"]), "parent_id": str(parent) if parent else None, "role": message["role"],
            "content": message["content"], "adapter_version": message.get("adapter_version")}
