"""Pure rules of the reward model's data: which feedback rows become preference pairs, and version bookkeeping."""

import json

import pytest

from worker.data import Split, TrainingData
from worker.reward import RewardTrainConfig, encode, preference_rows, validation_split, versions


def _turn(role, text):
    return [{"role": role, "content": text}]


def _data() -> TrainingData:
    prompt = _turn("user", "Q?")
    pair = {"prompt": prompt, "chosen": _turn("assistant", "good"), "rejected": _turn("assistant", "bad")}
    thumbs = [{"prompt": _turn("user", f"Q{i}?"), "completion": _turn("assistant", f"a{i}"), "label": i < 2}
              for i in range(5)]  # 2 up, 3 down
    return TrainingData(dpo=Split([pair], [pair]), kto=Split(thumbs, []))


def test_pairs_become_whole_conversations_and_thumbs_pair_up_across_prompts():
    rows = preference_rows(_data(), "train", thumb_pairs=2)
    assert rows[0] == {"chosen": [*_turn("user", "Q?"), *_turn("assistant", "good")],
                       "rejected": [*_turn("user", "Q?"), *_turn("assistant", "bad")], "source": "pair"}
    thumb_rows = [r for r in rows if r["source"] == "thumbs"]
    chosen = {r["chosen"][-1]["content"] for r in thumb_rows}
    rejected = {r["rejected"][-1]["content"] for r in thumb_rows}
    assert chosen == {"a0", "a1"} and rejected == {"a2", "a3", "a4"}  # every vote is used, ups always chosen
    assert len(thumb_rows) == len({json.dumps(r, sort_keys=True) for r in thumb_rows}) == 6  # all 2 x 3
    assert preference_rows(_data(), "train", thumb_pairs=2) == rows  # deterministic


def test_thumbs_need_both_labels_and_can_be_left_out():
    data = _data()
    assert [r["source"] for r in preference_rows(data, "train", thumb_pairs=0)] == ["pair"]
    data.kto.train = [r for r in data.kto.train if r["label"]]
    assert [r["source"] for r in preference_rows(data, "train", thumb_pairs=2)] == ["pair"]
    assert [r["source"] for r in preference_rows(data, "heldout", thumb_pairs=2)] == ["pair"]


def test_config_is_validated_with_the_fields_help():
    with pytest.raises(ValueError, match="RewardTrainConfig.batch_size=0 is invalid: Pairs per step"):
        RewardTrainConfig(batch_size=0)


class _Tokenizer:
    def apply_chat_template(self, conversation, tokenize, return_dict):
        return {"input_ids": list(range(len(conversation[-1]["content"])))}


def test_a_long_conversation_keeps_its_start_and_its_end():
    ids, cut = encode(_Tokenizer(), _turn("assistant", "x" * 100), max_length=40)
    assert cut and len(ids) == 40 and ids[:30] == list(range(30)) and ids[30:] == list(range(90, 100))
    assert encode(_Tokenizer(), _turn("assistant", "x" * 40), max_length=40) == (list(range(40)), False)


def test_only_complete_versions_count(tmp_path):
    assert versions(tmp_path / "missing") == []
    for name in ("1", "2", "3"):
        (tmp_path / name).mkdir()
    (tmp_path / "1.json").write_text("{}")
    (tmp_path / "3.json").write_text("{}")  # 2 has no JSON: an interrupted run
    (tmp_path / ".training-abc").mkdir()
    assert versions(tmp_path) == [1, 3]


def test_the_judge_sets_a_stable_share_of_training_prompts_aside_to_be_measured_on():
    thumbs = [{"prompt": _turn("user", f"Q{i}?"), "completion": _turn("assistant", f"a{i}"), "label": i % 3 == 0}
              for i in range(200)]
    heldout = [{"prompt": _turn("user", "H?"), "completion": _turn("assistant", "h"), "label": True}]
    data = TrainingData(kto=Split(thumbs, heldout))
    split = validation_split(data, 0.15, thumb_pairs=1)
    aside = [r for r in split.kto.heldout if r not in heldout]
    assert split.kto.heldout[:1] == heldout and 15 <= len(aside) <= 45  # about 30 of 200
    assert sorted(split.kto.train + aside, key=lambda r: r["completion"][0]["content"]) == \
        sorted(thumbs, key=lambda r: r["completion"][0]["content"])  # every vote on exactly one side
    assert validation_split(data, 0.15, thumb_pairs=1) == split  # the same prompts every run
    assert data.kto.train == thumbs and data.kto.heldout == heldout  # the run's own split is untouched
    assert validation_split(data, 0.0, thumb_pairs=1).kto.train == thumbs


def test_the_judge_keeps_its_training_rows_when_setting_aside_would_leave_none():
    two = TrainingData(kto=Split([{"prompt": _turn("user", f"Q{i}?"), "completion": _turn("assistant", f"a{i}"),
                                   "label": i == 0} for i in range(2)], []))
    assert len(preference_rows(two, "train", thumb_pairs=1)) == 1
    assert validation_split(two, 0.999, thumb_pairs=1) is two  # both set aside would leave no pair to learn


def test_the_judge_is_measured_on_both_labels_when_the_draw_misses_one():
    thumbs = [{"prompt": _turn("user", f"Q{i}?"), "completion": _turn("assistant", f"a{i}"), "label": i < 3}
              for i in range(40)]  # 3 up, 37 down: a 15% draw by prompt misses the ups as often as not
    data = TrainingData(kto=Split(thumbs, []))
    for share in (0.05, 0.15, 0.3):
        split = validation_split(data, share, thumb_pairs=1)
        assert {r["label"] for r in split.kto.heldout} == {True, False}
        assert sum(r["label"] for r in split.kto.train) >= 1  # the judge still learns what users approve
        assert len(split.kto.train) + len(split.kto.heldout) == len(thumbs)
        assert validation_split(data, share, thumb_pairs=1) == split  # stable
    one_up = TrainingData(kto=Split(thumbs[2:], []))
    assert not any(r["label"] for r in validation_split(one_up, 0.001, thumb_pairs=1).kto.heldout)  # its only up
    same_prompt = [{**row, "prompt": _turn("user", "Q0?")} if row["label"] else row for row in thumbs[1:]]
    assert not any(r["label"] for r in validation_split(TrainingData(kto=Split(same_prompt, [])), 0.001,
                                                        thumb_pairs=1).kto.heldout)  # both ups answer one prompt
