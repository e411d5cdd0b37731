"""Feedback -> training rows in TRL's conversational formats. The one place that decides what feedback teaches.

- sft: ``{"messages": [...context, assistant(edited)]}`` from edits;
- dpo: ``{"prompt": context, "chosen": [assistant], "rejected": [assistant]}`` from edits (edited over original),
  comparisons (preferred over each other sibling) and thumbs (an up over a down answer to the same context);
- kto: ``{"prompt": context, "completion": [assistant], "label": bool}`` from thumbs and ratings (>= 4 / <= 2).

The context is the conversation up to the rated reply, exactly as the model saw it. Retracted feedback, flagged
keys and deleted conversations are left out. The API, the CLI and the worker's dataset builder all call
``export_rows``; the worker also uses each row's owner and prompt key (per-owner caps, held-out split).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

Format = Literal["sft", "dpo", "kto"]
FORMATS: tuple[Format, ...] = ("sft", "dpo", "kto")
MAX_THUMB_PAIRS_PER_PROMPT = 16  # up x down answers to one context grows fast; keep the first pairs


@dataclass(frozen=True)
class ExportRow:
    data: dict  # the TRL row, exactly what is written to JSONL
    source: str  # edit | comparison | thumbs | thumb | rating
    owner: int
    prompt_key: str  # a stable hash of the context: held-out splits and de-duplication
    updated_at: datetime


@dataclass(frozen=True)
class ExportFilter:
    since: datetime | None = None  # on the feedback's last change
    until: datetime | None = None
    adapter: int | Literal["base"] | None = None  # the version that wrote the rated (or preferred) reply


async def export_rows(conn: asyncpg.Connection | asyncpg.Pool, fmt: Format, where: ExportFilter) -> list[ExportRow]:
    kinds = {"sft": ["edit"], "dpo": ["edit", "comparison", "thumb"], "kto": ["thumb", "rating"]}[fmt]
    feedback = await _live_feedback(conn, kinds, where)
    if not feedback:
        return []
    contexts = await _contexts(conn, {f["context_end"] for f in feedback if f["context_end"]})
    siblings = await _answers(conn, [f["message_id"] for f in feedback if f["kind"] == "comparison"])
    rows: list[ExportRow] = []
    thumbs_by_prompt: dict[str, list] = defaultdict(list)
    for f in feedback:
        context = contexts.get(f["context_end"], [])
        if not context or context[-1]["role"] != "user":
            continue  # the reply did not answer a user turn: nothing a trainer can use
        key = prompt_key(context)
        row = _row(fmt, f, context, key, siblings)
        rows.extend(row)
        if fmt == "dpo" and f["kind"] == "thumb":
            thumbs_by_prompt[key].append((f, context))
    if fmt == "dpo":
        rows.extend(_thumb_pairs(thumbs_by_prompt))
    return _deduplicated(rows)


def counts(rows: list[ExportRow]) -> dict[str, int]:
    return dict(sorted(Counter(r.source for r in rows).items())) | {"total": len(rows)}


def prompt_key(context: list[dict]) -> str:
    return hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _row(fmt: Format, f, context: list[dict], key: str, siblings) -> list[ExportRow]:
    def make(data: dict, source: str) -> ExportRow:
        return ExportRow(data, source, f["owner"], key, f["updated_at"])

    kind = f["kind"]
    if fmt == "sft" and kind == "edit":
        return [make({"messages": [*context, *_assistant(f["content"])]}, "edit")]
    if fmt == "dpo" and kind == "edit":
        return [make({"prompt": context, "chosen": _assistant(f["content"]), "rejected": _assistant(f["answer"])},
                     "edit")]
    if fmt == "dpo" and kind == "comparison":
        answers = siblings.get(f["message_id"], {})
        chosen = answers.get(f["preferred_message_id"])
        return [make({"prompt": context, "chosen": _assistant(chosen), "rejected": _assistant(text)}, "comparison")
                for answer_id, text in answers.items() if answer_id != f["preferred_message_id"] and chosen]
    if fmt == "kto" and kind == "thumb":
        return [make({"prompt": context, "completion": _assistant(f["answer"]), "label": f["value"] == 1}, "thumb")]
    if fmt == "kto" and kind == "rating" and f["value"] != 3:
        return [make({"prompt": context, "completion": _assistant(f["answer"]), "label": f["value"] >= 4}, "rating")]
    return []


def _thumb_pairs(by_prompt: dict[str, list]) -> list[ExportRow]:
    """An up-voted and a down-voted answer to the same context make a preference pair."""
    rows = []
    for key, votes in by_prompt.items():
        ups = [(f, c) for f, c in votes if f["value"] == 1]
        downs = [(f, c) for f, c in votes if f["value"] == -1]
        pairs = [(u, d) for u, d in itertools.product(ups, downs) if u[0]["answer"] != d[0]["answer"]]
        for (up, context), (down, _) in pairs[:MAX_THUMB_PAIRS_PER_PROMPT]:
            data = {"prompt": context, "chosen": _assistant(up["answer"]), "rejected": _assistant(down["answer"])}
            rows.append(ExportRow(data, "thumbs", down["owner"], key, max(up["updated_at"], down["updated_at"])))
    return rows


def _deduplicated(rows: list[ExportRow]) -> list[ExportRow]:
    seen, unique = set(), []
    for row in rows:
        identity = json.dumps(row.data, sort_keys=True)
        if identity not in seen:
            seen.add(identity)
            unique.append(row)
    return unique


async def _live_feedback(conn, kinds: list[str], where: ExportFilter):
    """Usable feedback rows with the rated answer and where its context ends (the rated reply's parent)."""
    adapter_clause = ""
    args: list = [kinds, where.since, where.until]
    if where.adapter == "base":
        adapter_clause = "AND coalesce(p.adapter_version, m.adapter_version) IS NULL"
    elif where.adapter is not None:
        adapter_clause = "AND coalesce(p.adapter_version, m.adapter_version) = $4"
        args.append(where.adapter)
    return await conn.fetch(
        f"""SELECT f.id, f.kind, f.value, f.content, f.preferred_message_id, f.owner, f.updated_at, f.message_id,
                   m.content AS answer,
                   CASE WHEN f.kind = 'comparison' THEN m.id ELSE m.parent_id END AS context_end
            FROM feedback f
            JOIN messages m ON m.id = f.message_id
            JOIN conversations c ON c.id = m.conversation_id
            JOIN api_keys k ON k.id = f.owner
            LEFT JOIN messages p ON p.id = f.preferred_message_id
            WHERE f.retracted_at IS NULL AND k.flagged_at IS NULL AND c.deleted_at IS NULL
              AND f.kind = ANY($1::text[])
              AND ($2::timestamptz IS NULL OR f.updated_at >= $2) AND ($3::timestamptz IS NULL OR f.updated_at < $3)
              {adapter_clause}
            ORDER BY f.updated_at, f.id""", *args)


async def _contexts(conn, ends: set[uuid.UUID]) -> dict[uuid.UUID, list[dict]]:
    """For each message id, the conversation from its root down to it, as chat messages."""
    rows = await conn.fetch(
        """WITH RECURSIVE chain AS (
               SELECT id AS leaf, parent_id, role, content, 0 AS depth FROM messages WHERE id = ANY($1::uuid[])
               UNION ALL
               SELECT chain.leaf, m.parent_id, m.role, m.content, chain.depth + 1
               FROM messages m JOIN chain ON m.id = chain.parent_id)
           SELECT leaf, role, content FROM chain ORDER BY leaf, depth DESC""", list(ends))
    contexts: dict[uuid.UUID, list[dict]] = defaultdict(list)
    for r in rows:
        contexts[r["leaf"]].append({"role": r["role"], "content": r["content"]})
    return contexts


async def _answers(conn, parents: list[uuid.UUID]) -> dict[uuid.UUID, dict[uuid.UUID, str]]:
    """The assistant answers under each parent, oldest first."""
    rows = await conn.fetch("SELECT id, parent_id, content FROM messages WHERE parent_id = ANY($1::uuid[]) "
                            "AND role = 'assistant' ORDER BY created_at, id", parents)
    answers: dict[uuid.UUID, dict[uuid.UUID, str]] = defaultdict(dict)
    for r in rows:
        answers[r["parent_id"]][r["id"]] = r["content"]
    return answers
