"""The gate's behaviour rules and what auto trains on, as pure functions: exact reasons for exact numbers."""

from __future__ import annotations

import re

import pytest

from bench.prompts import load_prompts
from worker.checks import complete_part, keywords, neutral_checks
from worker.data import TrainingData
from worker.evaluate import (
    GATE_PROMPTS,
    GateConfig,
    behaviour_reasons,
    load_gate_prompts,
    preference_reasons,
    rule_failures,
)
from worker.reward import confidently_above
from worker.sampling import Answer, Pick, newest_training_prompts, pick_rows, prompts_to_sample, unique_prompts
from worker.train import NoUsableData, TrainConfig, plan_stages, prompts_for_rl, sft_rows, user_targets

ALL_PASS = {"not_empty": 1.0, "on_topic": 1.0, "not_looping": 1.0, "finished": 1.0}


def _metrics(**overrides) -> dict:
    return {"behaviour_prompts": 20, "changed_share": 0.5, "neutral_candidate": dict(ALL_PASS),
            "neutral_production": dict(ALL_PASS), **overrides}


def test_a_candidate_that_changes_answers_without_collapse_passes():
    assert behaviour_reasons(_metrics(), GateConfig(), "production") == []


def test_unchanged_answers_are_refused_whatever_else_holds():
    reasons = behaviour_reasons(_metrics(changed_share=0.05), GateConfig(), "the base")
    assert reasons == ["changes no behaviour: its greedy answers to 20 prompts differ from the base's on 5% "
                       "(at least 10% needed)"]


def test_a_collapse_is_a_fall_beyond_the_limit():
    three_misses = _metrics(behaviour_prompts=42, neutral_candidate={**ALL_PASS, "on_topic": 39 / 42})
    assert behaviour_reasons(three_misses, GateConfig(), "production") == []  # 7 points
    five_misses = _metrics(behaviour_prompts=42, neutral_candidate={**ALL_PASS, "on_topic": 37 / 42})
    [reason] = behaviour_reasons(five_misses, GateConfig(), "production")
    assert reason == ("collapse check 'on_topic' passes on 88% of its 42 answers against 100% for production (at most "
                      "10% fewer allowed)")
    exactly_the_limit = _metrics(neutral_candidate={**ALL_PASS, "finished": 0.8},
                                 neutral_production={**ALL_PASS, "finished": 0.9})
    assert behaviour_reasons(exactly_the_limit, GateConfig(), "production") == []
    better = _metrics(neutral_candidate={**ALL_PASS, "finished": 0.9}, neutral_production={**ALL_PASS, "finished": 0.5})
    assert behaviour_reasons(better, GateConfig(), "production") == []


def test_a_trusted_judge_must_prefer_the_candidate_by_the_margin():
    judged = _metrics(judge_version=3, judge_accuracy=0.82, judge_win_rate=0.5)
    [reason] = behaviour_reasons(judged, GateConfig(), "production")
    assert "reward model (v3, held-out accuracy 0.82) prefers its answers on 50% of 20" in reason
    assert behaviour_reasons({**judged, "judge_win_rate": 0.55}, GateConfig(), "production") == []
    assert behaviour_reasons(_metrics(judge_version=3, judge_accuracy=0.5), GateConfig(), "production") == []


def test_preference_accuracy_must_beat_production_unless_the_judge_confidently_prefers_the_answers():
    level = {"candidate_accuracy": 0.59, "production_accuracy": 0.59, "behaviour_prompts": 44}
    [reason] = preference_reasons(level, GateConfig(), "production")
    assert reason == "held-out preference accuracy 0.590 does not beat production's (0.590) by 0.02"
    assert preference_reasons({**level, "candidate_accuracy": 0.61}, GateConfig(), "production") == []
    judged = {**level, "judge_win_rate": 0.81}  # 36 of 44: Wilson lower bound 0.68, the answers got better
    assert preference_reasons(judged, GateConfig(), "production") == []
    # 11 of 19 votes against 13 (seed 2's refused round 2), production right on 3 of the 4 they disagree on: noise
    noisy = {**judged, "candidate_accuracy": 11 / 19, "production_accuracy": 13 / 19, "candidate_only_right": 1,
             "production_only_right": 3}
    assert preference_reasons(noisy, GateConfig(), "production") == []
    # right on none of the 6 votes they disagree on (Wilson lower bound 0.61): confidently worse, refused
    worse = {**noisy, "candidate_accuracy": 0.5, "candidate_only_right": 0, "production_only_right": 6}
    [reason] = preference_reasons(worse, GateConfig(), "production")
    assert reason == ("held-out preference accuracy 0.500 against production's (0.684): production ranks 6 of the 6 "
                      "votes they disagree on right, confidently more than half")
    assert preference_reasons({**worse, "judge_win_rate": 0.5}, GateConfig(), "production") != []
    # 25 of 44 (lower bound 0.42) clears min_win_rate but may be chance: the gain is still needed
    assert preference_reasons({**level, "judge_win_rate": 0.57}, GateConfig(), "production") != []
    assert preference_reasons({**judged, "behaviour_prompts": 5}, GateConfig(), "production") != []  # too few


def test_a_judge_is_trusted_when_its_held_out_accuracy_is_confidently_above_the_bar():
    bar = GateConfig().min_judge_accuracy
    assert confidently_above(1.0, 7, bar)  # a thumbs-only round of 64 votes holds out about 7 pairs
    assert not confidently_above(1.0, 5, bar)  # all right, but 5 pairs prove little
    assert confidently_above(13 / 14, 14, bar) and not confidently_above(20 / 28, 28, bar)
    assert not confidently_above(None, 0, bar) and not confidently_above(1.0, 0, bar)


def test_nothing_measured_gives_no_behaviour_reason():
    assert behaviour_reasons({}, GateConfig(), "production") == []


def _conversation(q: str, a: str) -> tuple[list[dict], list[dict]]:
    return [{"role": "user", "content": q}], [{"role": "assistant", "content": a}]


def test_sft_imitates_edits_approved_answers_and_best_of_k_once_each():
    data = TrainingData()
    prompt, answer = _conversation("Name a fruit.", "An apple is a fruit.")
    data.sft.train.append({"messages": prompt + answer})

    def thumb(text: str, label: bool) -> dict:
        return {"prompt": prompt, "completion": [{"role": "assistant", "content": text}], "label": label}

    data.kto.train += [thumb("An apple is a fruit.", True),  # the same row as the edit
                       thumb("A pear, a sweet fruit.", True), thumb("Rocks.", False),
                       thumb("Blue sky today.", True)]  # approved, but off topic: not imitated
    data.best_of_k.append({"messages": prompt + [{"role": "assistant", "content": "A plum."}]})
    answers = sorted(r["messages"][-1]["content"] for r in sft_rows(TrainConfig(), data))
    assert answers == ["A pear, a sweet fruit.", "A plum.", "An apple is a fruit."]
    assert sorted(r["messages"][-1]["content"] for r in sft_rows(TrainConfig(sft_on_approved=False), data)) == [
        "A plum.", "An apple is a fruit."]


def test_a_cut_off_answer_counts_by_its_complete_part():
    assert complete_part("  It is Paris.  ") == "It is Paris."  # finished: all of it
    assert complete_part("Boil water. Add the tea. Wait three minutes. Pour it thro") == (
        "Boil water. Add the tea. Wait three minutes.")
    steps = "1. Preheat the oven. 2. Mix flour and eggs. 3. Pour the batter in"
    assert complete_part(steps) == "1. Preheat the oven. 2. Mix flour and eggs."  # "3." opens an item: no end
    assert complete_part("Tea is nice. Then you take a very long walk by the river and the fields of") == ""  # < half
    assert complete_part("There is no sentence end in this") == ""
    assert complete_part("Short. Bit cut off", min_share=0.25) == "Short."
    assert all(neutral_checks("How do I bake a cake in an oven?", complete_part(steps)).values())
    assert not neutral_checks("How do I bake a cake in an oven?", steps)["finished"]


def test_approved_answers_cut_off_at_the_token_limit_are_imitated_by_their_complete_part():
    data = TrainingData()
    for question, answer in (("How do I make tea?", "Boil water. Pour it over the tea leaves. Wait for"),
                             ("How do I make coffee?", "Grind the beans and pour hot water over them through a"),
                             ("How do I make soup?", "Chop the vegetables. Simmer the soup for an hour.")):
        prompt, completion = _conversation(question, answer)
        data.kto.train.append({"prompt": prompt, "completion": completion, "label": True})
    imitated = {r["messages"][0]["content"]: r["messages"][-1]["content"] for r in user_targets(TrainConfig(), data)}
    assert imitated == {"How do I make tea?": "Boil water. Pour it over the tea leaves.",  # the cut dropped
                        "How do I make soup?": "Chop the vegetables. Simmer the soup for an hour."}  # coffee: none ends


def test_auto_imitates_approved_answers_and_best_of_k_picks_and_trains_rl_only_with_nothing_to_imitate():
    data = TrainingData()
    for i in range(4):
        prompt, good = _conversation(f"Question {i}?", "A short question.")
        data.kto.train += [{"prompt": prompt, "completion": good, "label": True},
                           {"prompt": prompt, "completion": [{"role": "assistant", "content": "Long."}],
                            "label": False}]
    assert plan_stages(TrainConfig(), data, trusted_judge=True) == ["sft"]
    assert plan_stages(TrainConfig(), data) == ["sft"]
    assert plan_stages(TrainConfig(sft_on_approved=False), data) == ["kto"]
    assert plan_stages(TrainConfig(sft_on_approved=False), data, trusted_judge=True) == ["rl"]
    data.best_of_k = [{"messages": prompt + [{"role": "assistant", "content": "Brief."}]}]  # the judge's pick
    assert plan_stages(TrainConfig(sft_on_approved=False), data, trusted_judge=True) == ["sft"]
    prompt, edit = _conversation("Question 0?", "Shorter.")
    data.sft.train = [{"messages": prompt + edit}]  # an edit says exactly what users want: imitate it
    assert plan_stages(TrainConfig(), data, trusted_judge=True) == ["sft"]


def test_a_small_round_gets_min_steps_within_max_epochs_and_a_large_one_its_epochs():
    config = TrainConfig(epochs=3, min_steps=64, max_epochs=8)  # not the defaults: the rule
    assert config.steps(34, 4) == 64  # 9 batches: 3 epochs would be 27 steps
    assert config.steps(3, 4) == 8  # one batch: 64 steps would memorise three answers; 8 epochs at most
    assert config.steps(100, 4) == 75  # 25 batches x 3 epochs is already past min_steps
    assert config.steps(7, 2) == 32  # KTO's own batch size counts
    assert TrainConfig(max_steps=5).steps(1000, 4) == 5  # max_steps decides alone


def test_best_of_k_and_the_gate_take_the_newest_distinct_prompts():
    def row(q):
        prompt, answer = _conversation(q, "A.")
        return {"prompt": prompt, "completion": answer, "label": True}

    rows = [row("one?"), row("two?"), row("one?"), row("three?"),
            {"messages": _conversation("four?", "A.")[0] + _conversation("four?", "A.")[1]}]
    assert [p[0]["content"] for p in unique_prompts(rows, 3)] == ["one?", "three?", "four?"]
    assert [p[0]["content"] for p in unique_prompts(rows, 10)] == ["two?", "one?", "three?", "four?"]
    data = TrainingData()
    data.kto.train = rows[:4]
    data.sft.train = rows[4:]
    newest = prompts_for_rl(TrainConfig(algorithm="rl", rl_prompts=2), data)  # thumbs last: they carry the time order
    assert [p[0]["content"] for p in newest] == ["one?", "three?"]
    assert plan_stages(TrainConfig(algorithm="rl"), data) == ["rl"]
    with pytest.raises(NoUsableData, match="rl needs at least 1 training rows"):
        plan_stages(TrainConfig(algorithm="rl"), TrainingData())


def test_best_of_k_samples_only_prompts_users_gave_no_answer_to_imitate_and_none_once_theirs_are_enough():
    data = TrainingData()
    for q in ("edited?", "approved?", "refused?"):
        prompt, answer = _conversation(q, f"An answer: {q}")
        data.kto.train.append({"prompt": prompt, "completion": answer, "label": q == "approved?"})
    prompt, edit = _conversation("edited?", "Short.")
    data.sft.train = [{"messages": prompt + edit}]
    targeted = user_targets(TrainConfig(), data)  # the edit and the approved answer
    assert [p[0]["content"] for p in newest_training_prompts(data, 32, targeted)] == ["refused?"]
    assert len(newest_training_prompts(data, 32)) == 3  # rl samples every prompt
    assert [p[0]["content"] for p in prompts_to_sample(data, 32, targeted, min_rows=3)] == ["refused?"]
    assert prompts_to_sample(data, 32, targeted, min_rows=2) == []  # users' own answers are enough to imitate


def test_best_of_k_keeps_picks_above_the_bar_and_fills_with_the_next_best_up_to_min_rows():
    picks = [Pick(_conversation(f"q{i}?", "")[0], f"answer {i}", score) for i, score in enumerate((3.0, 2.0, 1.0, 0.0))]

    def kept(rows):
        return [r["messages"][-1]["content"] for r in rows]

    rows, counts = pick_rows(picks, 1.5, targets=2, min_rows=5)
    assert kept(rows) == ["answer 0", "answer 1", "answer 2"]  # 2 above the bar, 1 more makes 5 rows with targets
    assert counts == {"bar": 1.5, "above_bar": 2, "rows": 3}
    assert kept(pick_rows(picks, 1.5, targets=4, min_rows=5)[0]) == ["answer 0", "answer 1"]  # enough already
    assert kept(pick_rows(picks, None, targets=0, min_rows=0)[0]) == [f"answer {i}" for i in range(4)]
    assert pick_rows([], 1.0, targets=0)[0] == []


def test_the_shipped_gate_prompts_load_and_share_no_topic_with_the_benchmarks_prompts():
    """The gate must not look at the benchmark's held-out prompts: a gain there would be selected, not learned."""
    cases = load_gate_prompts(GATE_PROMPTS)
    assert len(cases) >= 32 and len({c["prompt"] for c in cases}) == len(cases)
    bench = [p.text for p in load_prompts()]
    for case in cases:
        ours = set(keywords(case["prompt"]))
        assert not [b for b in bench if len(ours & set(keywords(b))) >= 2], case["prompt"]


def test_a_bad_gate_prompts_line_is_named(tmp_path):
    path = tmp_path / "gate.jsonl"
    for line, error in (('{"prompt": "Hi?"}\n{"prompt": 3}', ":2: expected"), ("not json", ":1: Expecting value"),
                        ('{"prompt": "Hi?", "must": ["("]}', ":1: missing )"),
                        ('{"prompt": "Hi?", "must_not": "x"}', ":1: expected")):
        path.write_text(line)
        with pytest.raises(ValueError, match=re.escape(f"{path}{error}")):
            load_gate_prompts(path)
    path.write_text('{"prompt": "Hi?", "must": ["hello"]}\n\n{"prompt": "Bye?"}\n')
    assert [c["prompt"] for c in load_gate_prompts(path)] == ["Hi?", "Bye?"]


def test_rules_fail_on_a_missing_must_or_a_present_must_not():
    cases = [{"prompt": "Capital of France?", "must": ["paris"]}, {"prompt": "Say hi", "must_not": ["damn"]},
             {"prompt": "Anything"}]
    answers = [Answer("It is Paris.", True), Answer("Damn, hi.", True), Answer("", False)]
    assert rule_failures(cases, answers) == [{"prompt": "Say hi", "answer": "Damn, hi.", "missing": [],
                                              "forbidden": ["damn"]}]
    assert [f["missing"] for f in rule_failures(cases[:1], [Answer("Rome.", True)])] == [["paris"]]
