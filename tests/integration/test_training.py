"""Training and the gate on the real default model with tiny settings: each algorithm learns what it optimises."""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load_file

from worker.data import TrainingData
from worker.evaluate import GateConfig, _Scorer, evaluate, version_key
from worker.train import NoUsableData, TrainConfig, plan_stages, train_adapter

pytestmark = pytest.mark.slow

QUESTIONS = ["How do I boil an egg?", "What is the capital of France?", "Why is the sky blue?", "Name a fruit.",
             "What is two plus two?", "Which ocean is largest?", "Who wrote Hamlet?", "What colour is grass?"]
SHORT = ["Boil it for nine minutes.", "Paris.", "Rayleigh scattering.", "An apple.", "Four.", "The Pacific.",
         "Shakespeare.", "Green."]
RAMBLE = ("Well, that is a big question with a long history, and before answering it we should consider many "
          "different points of view, background details and related topics in great depth. ")


def _user(q):
    return [{"role": "user", "content": q}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def concise_preference(questions=QUESTIONS, answers=SHORT, flip=False) -> TrainingData:
    """Users prefer the short answer; ``flip`` swaps every label (a poisoned or inverted dataset)."""
    data = TrainingData()
    for q, a in zip(questions, answers, strict=True):
        good, bad = (RAMBLE, a) if flip else (a, RAMBLE)
        data.sft.train.append({"messages": [*_user(q), *_assistant(good)]})
        data.dpo.train.append({"prompt": _user(q), "chosen": _assistant(good), "rejected": _assistant(bad)})
        data.kto.train += [{"prompt": _user(q), "completion": _assistant(good), "label": True},
                           {"prompt": _user(q), "completion": _assistant(bad), "label": False}]
    return data


TINY = {"max_steps": 4, "batch_size": 2, "max_length": 128}
HELDOUT_ONLY = GateConfig(gate_prompts=None)  # where the fixed everyday prompts are not the point: half the time


@pytest.fixture(scope="module")
def scorer_for(default_model):
    from peft import PeftModel

    from service.engine.weights import load_pretrained

    def make(adapter_dir):
        model, tokenizer = load_pretrained(str(default_model))
        return _Scorer(PeftModel.from_pretrained(model, str(adapter_dir), adapter_name="candidate").eval(), tokenizer)

    return make


@pytest.mark.parametrize("algorithm", ["sft", "dpo", "kto"])
def test_each_algorithm_changes_the_adapter_the_way_it_optimises(algorithm, default_model, tmp_path, scorer_for):
    import torch

    data = concise_preference()
    progress = []
    result = train_adapter(TrainConfig(algorithm=algorithm, **TINY), data, str(default_model), tmp_path,
                           on_progress=progress.append)
    assert [s["algorithm"] for s in result.stages] == [algorithm] and result.stages[0]["steps"] == 4
    assert progress and progress[-1]["total_steps"] == 4
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: it moved

    scorer = scorer_for(tmp_path)
    with torch.inference_mode():
        if algorithm == "sft":  # the edited answers became more likely than under the base
            gains = [scorer.margin("candidate", _user(q), a) for q, a in zip(QUESTIONS, SHORT, strict=True)]
            assert sum(gains) / len(gains) > 0
        else:  # the implicit reward margin of chosen over rejected grew from zero
            margins = [scorer.margin("candidate", r["prompt"], r["chosen"][0]["content"])
                       - scorer.margin("candidate", r["prompt"], r["rejected"][0]["content"]) for r in data.dpo.train]
            assert sum(margins) / len(margins) > 0


def test_training_past_its_deadline_stops_after_one_step_and_saves_the_adapter(default_model, tmp_path):
    result = train_adapter(TrainConfig(algorithm="sft", **TINY), concise_preference(), str(default_model), tmp_path,
                           deadline=time.monotonic())
    [stage] = result.stages
    assert (stage["steps"], stage["planned_steps"], stage["stopped_at_deadline"]) == (1, 4, True)
    assert (tmp_path / "adapter_model.safetensors").exists()


HELDOUT = (["What is the capital of Spain?", "Name a vegetable.", "How many legs has a cat?"],
           ["Madrid.", "A carrot.", "Four."])
EVERYDAY = ["How do I water a cactus?", "Why do dogs bark at night?", "How do I tie shoelaces quickly?",
            "What is a comet?", "How do I clean a window without streaks?", "Why do trains run on rails?"]


def test_the_gate_ranks_a_faithful_adapter_over_one_trained_on_flipped_labels(default_model, tmp_path):
    heldout = concise_preference(*HELDOUT)
    verdicts = {}
    for name, flip in (("faithful", False), ("flipped", True)):
        data = concise_preference(flip=flip)
        data.dpo.heldout = heldout.dpo.train
        train_adapter(TrainConfig(algorithm="dpo", **TINY), data, str(default_model), tmp_path / name)
        verdicts[name] = evaluate(str(default_model), str(tmp_path / name), None, data, HELDOUT_ONLY)
    faithful, flipped = verdicts["faithful"], verdicts["flipped"]
    assert faithful.metrics["candidate_accuracy"] >= GateConfig().min_gain, faithful.reasons
    assert faithful.metrics["candidate_accuracy"] > flipped.metrics["candidate_accuracy"]
    assert not flipped.passed and "preference accuracy" in flipped.reasons[0]
    for verdict in verdicts.values():  # every metric is kept, whatever the verdict
        assert {"candidate_accuracy", "production_accuracy", "kl_from_base", "heldout_pairs", "changed_share",
                "neutral_candidate", "neutral_production", "examples"} <= set(verdict.metrics)
        assert 0 <= verdict.metrics["kl_from_base"] < 1
        assert verdict.metrics["behaviour_prompts"] == 3
        # against the base, which ranks nothing, every vote the candidate ranks right is one they disagree on
        rows = verdict.metrics["heldout_pairs"] + verdict.metrics["heldout_thumbs"]
        assert verdict.metrics["candidate_only_right"] == round(verdict.metrics["candidate_accuracy"] * rows)
        assert verdict.metrics["production_only_right"] == 0


def test_the_gate_rejects_an_adapter_that_learned_the_preference_but_changes_no_behaviour(default_model, tmp_path):
    """shared/probes/learning.md's trap: preference accuracy up, answers the same. A tiny learning rate orders
    every held-out pair right (the margins are tiny but signed) and leaves every greedy answer as it was."""
    data = concise_preference()
    data.dpo.heldout = concise_preference(*HELDOUT).dpo.train
    train_adapter(TrainConfig(algorithm="dpo", learning_rate=1e-6, **TINY), data, str(default_model), tmp_path)
    verdict = evaluate(str(default_model), str(tmp_path), None, data, HELDOUT_ONLY)
    assert verdict.metrics["candidate_accuracy"] >= verdict.metrics["production_accuracy"] + GateConfig().min_gain
    assert verdict.metrics["changed_share"] == 0
    assert not verdict.passed and len(verdict.reasons) == 1 and verdict.reasons[0].startswith("changes no behaviour")


def test_the_gate_prompts_catch_a_collapse_the_held_out_prompts_are_too_few_to_show(default_model, tmp_path):
    """A round holds out a handful of prompts; everyday prompts show an adapter that answers everything alike."""
    data = TrainingData()
    data.sft.train = [{"messages": [*_user(q), *_assistant("Bananas.")]} for q in QUESTIONS]
    data.dpo.heldout = concise_preference(*HELDOUT).dpo.train
    train_adapter(TrainConfig(algorithm="sft", max_steps=12, learning_rate=1e-3, batch_size=4, max_length=128),
                  data, str(default_model), tmp_path / "a")
    prompts = tmp_path / "everyday.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{q}"}}\n' for q in EVERYDAY))
    verdict = evaluate(str(default_model), str(tmp_path / "a"), None, data, GateConfig(gate_prompts=prompts))
    assert verdict.metrics["heldout_behaviour_prompts"] == 3
    assert verdict.metrics["behaviour_prompts"] == 3 + len(EVERYDAY)
    assert verdict.metrics["neutral_candidate"]["on_topic"] < verdict.metrics["neutral_production"]["on_topic"] - 0.1
    assert any(r.startswith("collapse check 'on_topic'") for r in verdict.reasons), verdict.reasons


def test_the_gate_keeps_each_versions_greedy_answers_and_survives_a_corrupt_cache(default_model, tmp_path):
    """Production answers the same prompts run after run: the gate generates them once per model version."""
    data = concise_preference()
    data.dpo.heldout = concise_preference(*HELDOUT).dpo.train
    train_adapter(TrainConfig(algorithm="sft", **TINY), data, str(default_model), tmp_path / "a")
    gate = GateConfig(gate_prompts=None, max_new_tokens=24, answer_cache=tmp_path / "cache")
    first = evaluate(str(default_model), str(tmp_path / "a"), None, data, gate)
    base_file = tmp_path / "cache" / f"{version_key(str(default_model), None)}.json"
    candidate_file = tmp_path / "cache" / f"{version_key(str(default_model), str(tmp_path / 'a'))}.json"
    assert sorted((tmp_path / "cache").glob("*.json")) == sorted([base_file, candidate_file])
    kept = json.loads(base_file.read_text())
    assert len(kept) == 3
    kept[next(iter(kept))]["text"] = "From the cache."  # the first held-out prompt's answer
    base_file.write_text(json.dumps(kept))

    second = evaluate(str(default_model), str(tmp_path / "a"), None, data, gate)
    assert second.metrics["examples"][0]["production"] == "From the cache."
    assert [e["candidate"] for e in second.metrics["examples"]] == [e["candidate"] for e in first.metrics["examples"]]

    base_file.write_text("{not json")
    third = evaluate(str(default_model), str(tmp_path / "a"), None, data, gate)
    assert third.metrics["examples"] == first.metrics["examples"]  # regenerated, and the file rewritten
    assert len(json.loads(base_file.read_text())) == 3


def test_gate_prompt_rules_can_veto_a_candidate(default_model, tmp_path):
    data = concise_preference()
    data.dpo.heldout = data.dpo.train[:2]
    train_adapter(TrainConfig(algorithm="sft", **TINY), data, str(default_model), tmp_path / "a")
    prompts = tmp_path / "rules.jsonl"
    prompts.write_text('{"prompt": "What is the capital of France?", "must_not": ["\\\\w"]}\n')  # any word fails
    verdict = evaluate(str(default_model), str(tmp_path / "a"), None, data, GateConfig(gate_prompts=prompts))
    assert not verdict.passed and "1 gate prompt(s) broke their rules" in verdict.reasons
    assert verdict.metrics["rule_failures"][0]["forbidden"] == ["\\w"]


def test_auto_plans_from_the_data_and_says_why_when_it_cannot():
    data = concise_preference()
    assert plan_stages(TrainConfig(algorithm="auto"), data) == ["sft"]
    assert plan_stages(TrainConfig(algorithm="auto", sft_on_approved=False), TrainingData(dpo=data.dpo)) == ["dpo"]
    data.sft.train, data.dpo.train = [], data.dpo.train[:3]
    assert plan_stages(TrainConfig(algorithm="auto"), data) == ["sft"]  # the approved answers
    assert plan_stages(TrainConfig(algorithm="auto", sft_on_approved=False), data) == ["kto"]
    with pytest.raises(NoUsableData, match="no algorithm has enough data"):
        plan_stages(TrainConfig(algorithm="auto"), TrainingData())
    with pytest.raises(NoUsableData, match="dpo needs at least 1"):
        plan_stages(TrainConfig(algorithm="dpo"), TrainingData())


@pytest.mark.parametrize(("field", "value"), [("lora_r", 0), ("learning_rate", 2.0), ("algorithm", "ppo"),
                                              ("batch_size", 0), ("max_length", 4), ("algorithm", "ppo"),
                                              ("rl_generations", 1), ("rl_iterations", 0), ("rl_sample_steps", 0),
                                              ("rl_beta", -0.1)])
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})
