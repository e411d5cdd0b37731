"""Feedback bodies: one tagged union on ``kind``, so an unknown kind or a field of another kind is a 400."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Comment = Annotated[str, Meta(max_length=2000)]
Tag = Annotated[str, Meta(min_length=1, max_length=40)]


class ThumbFeedback(msgspec.Struct, tag="thumb", tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    value: Literal[1, -1]
    comment: Comment | None = None
    tags: Annotated[list[Tag], Meta(max_length=10)] = []


class RatingFeedback(msgspec.Struct, tag="rating", tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    value: Annotated[int, Meta(ge=1, le=5)]
    comment: Comment | None = None


class EditFeedback(msgspec.Struct, tag="edit", tag_field="kind", forbid_unknown_fields=True, kw_only=True):
    content: str
    comment: Comment | None = None


class ComparisonFeedback(msgspec.Struct, tag="comparison", tag_field="kind", forbid_unknown_fields=True,
                         kw_only=True):
    preferred_message_id: uuid.UUID
    comment: Comment | None = None


Feedback = ThumbFeedback | RatingFeedback | EditFeedback | ComparisonFeedback
Kind = Literal["thumb", "rating", "edit", "comparison"]


class FlagKey(msgspec.Struct, forbid_unknown_fields=True):
    reason: Annotated[str, Meta(max_length=500)] | None = None
