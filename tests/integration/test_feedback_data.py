"""Stats and export on a hand-built fixture whose every number is counted by hand below."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service import db
from service.feedback.export import ExportFilter, counts, export_rows
from service.feedback.stats import adapter_stats, wilson_interval

D1 = datetime(2026, 11, 20, 10, tzinfo=UTC)
D2 = datetime(2026, 11, 21, 15, tzinfo=UTC)
SYSTEM = {"role": "system", "content": "Be brief."}
Q1 = {"role": "user", "content": "Q1"}


@pytest.fixture
async def pool(database_url):
    pool = await db.create_pool(database_url, 2)
    yield pool
    await pool.close()


@pytest.fixture
async def fixture(pool):
    """Three keys (mallory flagged), adapters v1 and v2, five replies, and their feedback."""
    ids = {}
    for name in ("alice", "bob", "mallory"):
        ids[name] = await pool.fetchval("INSERT INTO api_keys (name, role, key_hash, key_prefix) "
                                        "VALUES ($1, 'user', $1, 'fw-') RETURNING id", name)
    await pool.execute("UPDATE api_keys SET flagged_at = now() WHERE name = 'mallory'")
    for name in ("v1", "v2"):
        await pool.execute("INSERT INTO adapters (name, base_model, algorithm, status, path, sha256, size_bytes) "
                           "VALUES ($1, 'base', 'sft', 'candidate', '/x', $2, 1)", name, "0" * 64)

    async def conversation(owner, *turns):
        cid = await pool.fetchval("INSERT INTO conversations (owner) VALUES ($1) RETURNING id", ids[owner])
        parent = None
        for role, content in turns:
            parent = await pool.fetchval("INSERT INTO messages (conversation_id, parent_id, role, content) "
                                         "VALUES ($1, $2, $3, $4) RETURNING id", cid, parent, role, content)
        return cid, parent

    async def answer(cid, parent, content, version, day):
        return await pool.fetchval(
            "INSERT INTO messages (conversation_id, parent_id, role, content, adapter_version, created_at, "
            "completion_tokens) VALUES ($1, $2, 'assistant', $3, $4, $5, 1) RETURNING id",
            cid, parent, content, version, day)

    a, u1 = await conversation("alice", ("system", "Be brief."), ("user", "Q1"))
    ids["a1"] = await answer(a, u1, "long answer 1", None, D1)
    ids["a2"] = await answer(a, u1, "short 1", 1, D1)  # a regenerated sibling
    b, u2 = await conversation("bob", ("user", "Q2"))
    ids["b1"] = await answer(b, u2, "answer b1", 1, D2)
    c, u3 = await conversation("bob", ("system", "Be brief."), ("user", "Q1"))  # the same context as alice's
    ids["c1"] = await answer(c, u3, "answer c1", 2, D2)
    m, u4 = await conversation("mallory", ("user", "Q3"))
    ids["m1"] = await answer(m, u4, "answer m1", 1, D2)

    async def vote(owner, message, kind, value=None, content=None, preferred=None, retracted=False):
        await pool.execute(
            "INSERT INTO feedback (message_id, owner, kind, value, content, preferred_message_id, retracted_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)", message, ids[owner], kind, value, content, preferred,
            datetime.now(UTC) if retracted else None)

    await vote("alice", ids["a2"], "thumb", 1)
    await vote("alice", ids["a1"], "thumb", -1)
    await vote("alice", u1, "comparison", preferred=ids["a2"])
    await vote("alice", ids["a1"], "edit", content="fixed 1")
    await vote("alice", ids["a2"], "rating", 5)
    await vote("alice", ids["a1"], "rating", 1, retracted=True)
    await vote("bob", ids["b1"], "thumb", 1)
    await vote("bob", ids["b1"], "rating", 2)
    await vote("bob", ids["c1"], "thumb", -1)
    await vote("mallory", ids["m1"], "thumb", 1)
    await vote("mallory", ids["m1"], "edit", content="poison")
    ids["conversations"] = {"alice": a, "bob-q2": b}
    return ids


def test_wilson_interval_matches_the_textbook():
    low, high = wilson_interval(8, 10)  # the usual worked example: 8 of 10 -> [0.490, 0.943]
    assert low == pytest.approx(0.4902, abs=5e-4) and high == pytest.approx(0.9433, abs=5e-4)
    assert wilson_interval(0, 0) is None
    for trials in (5, 48, 1000):  # exact at the ends: 0 of 48 left 7e-18, which a plot's error bar refuses
        assert wilson_interval(0, trials)[0] == 0.0 and wilson_interval(trials, trials)[1] == 1.0


async def test_stats_per_version_and_day_are_exact(pool, fixture):
    stats = {s["version"]: s for s in await adapter_stats(pool, None, None)}
    assert set(stats) == {None, 1, 2}

    base = stats[None]["totals"]
    assert (base["replies"], base["thumbs_up"], base["thumbs_down"], base["ratings"], base["edits"]) == (1, 0, 1, 0, 1)
    assert (base["comparisons"], base["comparison_wins"], base["approval"]) == (1, 0, 0.0)

    v1 = stats[1]["totals"]  # a2 (alice), b1 (bob), m1 (mallory: flagged, so her votes do not count)
    assert (v1["replies"], v1["thumbs_up"], v1["thumbs_down"], v1["edits"]) == (3, 2, 0, 0)
    assert (v1["ratings"], v1["mean_rating"]) == (2, 3.5)
    assert (v1["comparisons"], v1["comparison_wins"], v1["comparison_win_rate"]) == (1, 1, 1.0)
    assert v1["approval"] == 1.0 and v1["approval_ci95"] == pytest.approx(list(wilson_interval(2, 2)))
    day1, day2 = stats[1]["by_day"]
    assert (day1["day"], day1["replies"], day1["thumbs_up"], day1["ratings"], day1["mean_rating"]) == \
        ("2026-11-20", 1, 1, 1, 5.0)
    assert (day2["day"], day2["replies"], day2["thumbs_up"], day2["ratings"], day2["mean_rating"]) == \
        ("2026-11-21", 2, 1, 1, 2.0)

    v2 = stats[2]["totals"]
    assert (v2["replies"], v2["thumbs_up"], v2["thumbs_down"], v2["approval"]) == (1, 0, 1, 0.0)

    only_day2 = {s["version"]: s["totals"] for s in await adapter_stats(pool, D2 - timedelta(hours=1), None)}
    assert set(only_day2) == {1, 2} and only_day2[1]["replies"] == 2
    (single,) = await adapter_stats(pool, None, None, 2, only_version=True)
    assert single["version"] == 2 and single["totals"] == v2


async def test_sft_export_holds_the_edits_with_their_context(pool, fixture):
    rows = await export_rows(pool, "sft", ExportFilter())
    assert [r.data for r in rows] == [{"messages": [SYSTEM, Q1, {"role": "assistant", "content": "fixed 1"}]}]
    assert rows[0].owner == fixture["alice"]


async def test_dpo_export_pairs_edits_comparisons_and_opposite_thumbs(pool, fixture):
    rows = await export_rows(pool, "dpo", ExportFilter())
    pairs = {(r.source, r.data["chosen"][0]["content"], r.data["rejected"][0]["content"]) for r in rows}
    assert pairs == {
        ("edit", "fixed 1", "long answer 1"),
        ("comparison", "short 1", "long answer 1"),
        # a2 up over a1 down is the comparison's pair again (kept once); a2 up over bob's c1 down, same context
        ("thumbs", "short 1", "answer c1"),
    }
    assert all(r.data["prompt"] == [SYSTEM, Q1] for r in rows)
    assert counts(rows) == {"comparison": 1, "edit": 1, "thumbs": 1, "total": 3}


async def test_kto_export_labels_thumbs_and_ratings(pool, fixture):
    rows = await export_rows(pool, "kto", ExportFilter())
    labelled = {(r.source, r.data["completion"][0]["content"], r.data["label"]) for r in rows}
    assert labelled == {("thumb", "short 1", True), ("thumb", "long answer 1", False),
                        ("thumb", "answer b1", True), ("thumb", "answer c1", False),
                        ("rating", "answer b1", False)}  # a2's 5 stars repeat its thumb; a1's 1 was retracted
    v1 = await export_rows(pool, "kto", ExportFilter(adapter=1))
    assert {r.data["completion"][0]["content"] for r in v1} == {"short 1", "answer b1"} and len(v1) == 3
    base = await export_rows(pool, "kto", ExportFilter(adapter="base"))
    assert [r.data["completion"][0]["content"] for r in base] == ["long answer 1"]
    future = datetime.now(UTC) + timedelta(days=1)
    assert await export_rows(pool, "kto", ExportFilter(since=future)) == []


async def test_deleted_conversations_and_flagged_keys_stay_out_of_exports(pool, fixture):
    await pool.execute("UPDATE conversations SET deleted_at = now() WHERE id = $1", fixture["conversations"]["alice"])
    assert await export_rows(pool, "sft", ExportFilter()) == []
    await pool.execute("UPDATE api_keys SET flagged_at = NULL WHERE name = 'mallory'")
    rows = await export_rows(pool, "sft", ExportFilter())
    assert [r.data["messages"][-1]["content"] for r in rows] == ["poison"]  # unflagged: counted again


async def test_export_rows_are_accepted_by_trl_trainers(pool, fixture, default_model, tmp_path):
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

    from service.engine.weights import load_pretrained

    model, tokenizer = load_pretrained(str(default_model))
    lora = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    common = {"output_dir": str(tmp_path), "report_to": "none", "use_cpu": True, "bf16": False, "max_steps": 1,
              "per_device_train_batch_size": 2, "max_length": 128}
    for fmt, trainer_class, config_class in (("sft", SFTTrainer, SFTConfig), ("dpo", DPOTrainer, DPOConfig),
                                             ("kto", KTOTrainer, KTOConfig)):
        rows = [r.data for r in await export_rows(pool, fmt, ExportFilter())]
        dataset = datasets.Dataset.from_list(rows)
        trainer = trainer_class(model=model, args=config_class(**common), train_dataset=dataset,
                                processing_class=tokenizer, peft_config=lora)
        tokenized = trainer.train_dataset
        assert len(tokenized) == len(rows), fmt
        id_columns = [name for name in tokenized.column_names if name.endswith("_ids")]
        assert id_columns, (fmt, tokenized.column_names)
        assert all(len(row[c]) > 0 for row in tokenized for c in id_columns)
        model = trainer.model.unload() if hasattr(trainer.model, "unload") else model  # a clean base for the next
