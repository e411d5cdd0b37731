"""Capturing feedback: thumbs, ratings, edits and pairwise choices on assistant replies.

Every check that needs the stored conversation is decided here (visibility, which role was rated, whether an edit
changes anything, whether two answers are siblings); the first two travel inside the write itself (store.save), so
a thumb needs one statement, shared with the votes that arrive meanwhile (group_commit.py). The database keeps one
row per (message, owner, kind). A 2xx means the row is committed. This module does not decide what feedback is
worth training on: see export.py.
"""

from __future__ import annotations

import uuid
from typing import NoReturn

import asyncpg

from service.auth import Caller, Role
from service.chat import store as chat_store
from service.errors import ClientError, NotFound
from service.feedback import store
from service.feedback.group_commit import GroupCommit
from service.feedback.schemas import ComparisonFeedback, EditFeedback, Feedback, Kind, RatingFeedback, ThumbFeedback
from service.settings import Settings

KINDS: tuple[Kind, ...] = ("thumb", "rating", "edit", "comparison")


def present(row: asyncpg.Record) -> dict:
    """A feedback row as the API shows it; a comparison names the parent of the answers it chose among."""
    body = {k: row[k] for k in ("id", "kind", "value", "content", "preferred_message_id", "comment", "tags",
                                "created_at", "updated_at")}
    body["parent_id" if row["kind"] == "comparison" else "message_id"] = row["message_id"]
    return body


class FeedbackService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings):
        self.pool, self.settings = pool, settings
        self.writes = GroupCommit(pool)

    async def put(self, caller: Caller, message_id: uuid.UUID, body: Feedback) -> tuple[dict, bool]:
        """(the stored feedback, True if new rather than replacing the caller's earlier one of that kind).

        Thumbs and ratings need nothing from the message but that the caller may rate it, which the write itself
        checks; edits and comparisons read the message first, for its content or its siblings."""
        fields: dict = {"owner": caller.owner, "kind": body.__struct_config__.tag, "comment": body.comment,
                        "message_id": message_id}
        if isinstance(body, ThumbFeedback):
            fields.update(value=body.value, tags=tuple(sorted(set(body.tags))))
        elif isinstance(body, RatingFeedback):
            fields.update(value=body.value)
        elif isinstance(body, EditFeedback):
            message = await self._rated_message(caller, message_id)
            fields.update(content=self._edited(body.content, message["content"]))
        elif isinstance(body, ComparisonFeedback):
            message = await self._rated_message(caller, message_id)
            siblings = await store.sibling_ids(self.pool, message["parent_id"])
            if body.preferred_message_id not in siblings:
                raise ClientError("preferred_message_id must be this reply or another answer to the same message "
                                  "(POST /api/messages/{id}/regenerate makes one)", field="preferred_message_id")
            if len(siblings) < 2:
                raise ClientError("there is nothing to compare: this reply has no sibling answers yet",
                                  field="preferred_message_id")
            fields.update(message_id=message["parent_id"], preferred_message_id=body.preferred_message_id)
        saved = await self.writes.save(store.Write(rated_id=message_id, sees_everyone=caller.sees_everyone, **fields))
        if saved.row is None:
            _refuse(saved.role, saved.visible)
        return present(saved.row), saved.created

    async def get(self, caller: Caller, message_id: uuid.UUID) -> list[dict]:
        message = await self._rated_message(caller, message_id)
        rows = await store.for_message(self.pool, message_id=message_id, parent_id=message["parent_id"],
                                       owner=caller.owner)
        return [present(r) for r in rows]

    async def retract(self, caller: Caller, message_id: uuid.UUID, kind: Kind | None) -> int:
        """Retract the caller's feedback of ``kind`` (all kinds when None); the rows stay, marked retracted."""
        message = await self._rated_message(caller, message_id)
        kinds = [kind] if kind else list(KINDS)
        targets = [message_id] + ([message["parent_id"]] if "comparison" in kinds else [])
        return await store.retract(self.pool, message_ids=targets, owner=caller.owner, kinds=kinds)

    async def flag_key(self, caller: Caller, key_id: int, reason: str | None, flagged: bool) -> None:
        caller.require(Role.operator)
        if not await store.set_flag(self.pool, key_id, reason, flagged):
            raise NotFound(f"no API key with id {key_id}", field="key_id")

    async def _rated_message(self, caller: Caller, message_id: uuid.UUID) -> asyncpg.Record:
        message = await chat_store.get_message(self.pool, message_id)
        if message is None:
            _refuse(None, False)
        visible = message["deleted_at"] is None and caller.may_see(message["owner"])
        if not visible or message["role"] != "assistant":
            _refuse(message["role"], visible)
        return message

    def _edited(self, content: str, original: str) -> str:
        if not content.strip():
            raise ClientError("the edited answer is empty", field="content")
        if len(content) > self.settings.auth.max_message_chars:
            raise ClientError(f"the edited answer is longer than {self.settings.auth.max_message_chars} characters",
                              field="content")
        if content.strip() == original.strip():
            raise ClientError("the edit is identical to the original answer", field="content")
        return content


def _refuse(role: str | None, visible: bool) -> NoReturn:
    """The error for a message the caller may not rate: unknown and invisible look alike (404), so that a user
    cannot probe other users' message ids; a visible non-assistant message is a 400."""
    if role is None or not visible:
        raise NotFound("no such message", field="message_id")
    raise ClientError(f"feedback is for assistant replies; this is a {role} message", field="message_id")
