"""The reward model on the real default model, trained a few steps on a clearly separable preference: polite,
complete answers over "I don't know." and gibberish. It must order held-out pairs (questions it never saw) the
same way, record that accuracy beside the saved version, and give the same finite scores once reloaded."""

from __future__ import annotations

import json
import math
import random

import pytest

from worker.checks import complete_part, neutral_checks
from worker.data import Split, TrainingData
from worker.reward import RewardModel, RewardTrainConfig, train_reward_model, versions
from worker.sampling import best_of_k, generate, last_user_turn

pytestmark = pytest.mark.slow

QA = [
    ("How do I boil an egg?", "Put the egg in boiling water for nine minutes, then cool it in cold water."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Why is the sky blue?", "Air scatters blue sunlight more than red light, so the sky looks blue."),
    ("How can I sleep better?", "Keep a regular bedtime and avoid screens for an hour before sleep."),
    ("What is a healthy breakfast?", "Oats with fruit and yoghurt make a healthy, filling breakfast."),
    ("How do I make tea?", "Pour just-boiled water over a tea bag and let it steep for three minutes."),
    ("Why do cats purr?", "Cats mostly purr when they feel calm and content."),
    ("What should I pack for a hike?", "Pack water, snacks, a map, warm layers and a small first-aid kit."),
    ("How many minutes are in a day?", "There are 1,440 minutes in a day."),
    ("How do I water a cactus?", "Water it deeply every two to three weeks and let the soil dry out in between."),
    ("What is a good name for a dog?", "Biscuit is a friendly name for a dog."),
    ("Why do leaves fall in autumn?", "Trees drop their leaves to save water and energy through the winter."),
    ("How do I clean a mirror?", "Spray it with glass cleaner and wipe it with a dry microfibre cloth."),
    ("What is 15 percent of 200?", "Fifteen percent of 200 is 30."),
    ("How do I stay focused?", "Work in short blocks, silence your phone and take a break every hour."),
    ("Who wrote Hamlet?", "Hamlet was written by William Shakespeare."),
    # held out: the model never trains on these questions
    ("How do I cook pasta?", "Boil salted water, add the pasta and cook it for about ten minutes."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("Why do we need water?", "Our bodies need water to control temperature and carry nutrients."),
    ("How can I save money?", "Set a monthly budget and move some money to savings on payday."),
    ("What is a good houseplant?", "A snake plant is easy to keep and needs little light."),
    ("How do I tie my shoes?", "Make two loops, cross them, and pull one through the gap."),
    ("Why do birds migrate?", "Birds migrate to find food and warmer weather for the winter."),
    ("How many days are in a week?", "There are seven days in a week."),
]
TRAIN, HELDOUT = QA[:16], QA[16:]


def _gibberish(rng: random.Random) -> str:
    return " ".join("".join(rng.choice("qxzjvkwprtbn") for _ in range(rng.randint(3, 8))) for _ in range(6))


def separable(pairs: list[tuple[str, str]], seed: int) -> tuple[list[dict], list[dict]]:
    """(DPO rows, KTO rows): the good answer over a non-answer, and the same as up and down thumbs."""
    rng = random.Random(seed)
    dpo, kto = [], []
    for i, (question, answer) in enumerate(pairs):
        prompt = [{"role": "user", "content": question}]
        bad = "I don't know." if i % 2 else _gibberish(rng)
        dpo.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": bad}]})
        kto.append({"prompt": prompt, "completion": [{"role": "assistant", "content": answer if i % 2 else bad}],
                    "label": bool(i % 2)})
    return dpo, kto


@pytest.fixture(scope="module")
def trained(default_model, tmp_path_factory):
    """(result, data, root, progress) of one reward model trained a few steps on the separable set."""
    (train_dpo, train_kto), (heldout_dpo, heldout_kto) = separable(TRAIN, 0), separable(HELDOUT, 1)
    data = TrainingData(dpo=Split(train_dpo, heldout_dpo), kto=Split(train_kto, heldout_kto))
    config = RewardTrainConfig(max_steps=6, batch_size=4, max_length=128, learning_rate=3e-4, thumb_pairs=1,
                               validation_share=0.0)  # held out: exactly the questions above (its split: unit tests)
    progress = []
    root = tmp_path_factory.mktemp("reward") / "reward"
    result = train_reward_model(config, data, str(default_model), root, on_progress=progress.append)
    return result, data, root, progress


def test_the_reward_model_orders_held_out_pairs_and_records_its_accuracy(default_model, trained):
    result, data, root, progress = trained
    heldout_dpo = data.dpo.heldout

    metrics = result.metrics
    assert result.version == 1 and versions(root) == [1]
    assert metrics["counts"] == {"train_pairs": 16, "train_thumb_pairs": 8, "heldout_pairs": 8,
                                 "heldout_thumb_pairs": 4, "truncated": 0}
    assert metrics["steps"] == 6 and any("loss" in p for p in progress)
    assert metrics["loss_last"] < metrics["loss_first"]  # it learned the preference it optimises
    assert metrics["heldout_accuracy"] >= 0.9, metrics  # chance is 0.5
    assert metrics["heldout_margin"] > 0
    recorded = json.loads((root / "1.json").read_text())
    assert recorded["heldout_accuracy"] == metrics["heldout_accuracy"] and recorded["version"] == 1

    judge = RewardModel.latest(root, str(default_model))
    assert judge is not None and judge.version == 1 and judge.trusted(0.6)
    prompts = [r["prompt"] for r in heldout_dpo]
    chosen = judge.score(prompts, [r["chosen"][0]["content"] for r in heldout_dpo])
    rejected = judge.score(prompts, [r["rejected"][0]["content"] for r in heldout_dpo])
    assert all(math.isfinite(s) for s in chosen + rejected)
    reloaded_accuracy = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(chosen)
    assert reloaded_accuracy >= 0.85, (chosen, rejected)
    assert abs(reloaded_accuracy - metrics["heldout_pair_accuracy"]) < 1e-9  # the saved model is the measured one


def test_best_of_k_keeps_the_judges_favourite_complete_answer_per_prompt(default_model, trained):
    from service.engine.weights import load_pretrained

    result, _, _, _ = trained
    judge = RewardModel(result.path, str(default_model))
    model, tokenizer = load_pretrained(str(default_model))
    prompts = [[{"role": "user", "content": q}] for q in (
        "What is the capital of Japan?", "How many days are in a week?", "Who wrote Hamlet?",
        "Explain in detail how a refrigerator keeps food cold.")]  # a long answer: cut off at 96 tokens
    rows, counts = best_of_k(model, tokenizer, judge, prompts, k=3, max_new_tokens=96, seed=7)
    assert counts["prompts"] == counts["prompts_sampled"] == 4 and counts["samples"] == 12
    assert 1 <= counts["rows"] == len(rows) <= 4
    late, counts_late = best_of_k(model, tokenizer, judge, prompts, k=3, max_new_tokens=96, seed=7, deadline=0.0)
    assert late == [] and counts_late["prompts_sampled"] == counts_late["samples"] == 0  # past its time: no picks

    samples = generate(model, tokenizer, prompts, max_new_tokens=96, k=3, temperature=0.9, seed=7)  # the same draw
    usable = [[(part, not a.finished) for a in answers if (part := complete_part(a.text))
               and all(neutral_checks(last_user_turn(prompt), part).values())]
              for prompt, answers in zip(prompts, samples, strict=True)]
    assert counts["usable_samples"] == sum(map(len, usable))
    assert counts["usable_cut_off"] == sum(cut for parts in usable for _, cut in parts) >= 1  # the long answers
    for row in rows:
        i = prompts.index(row["messages"][:-1])
        kept, competing = row["messages"][-1]["content"], [part for part, _ in usable[i]]
        assert kept in competing  # a complete answer, or the complete part of a cut-off one; never collapsed
        scores = judge.score([prompts[i]] * len(competing), competing)
        assert scores[competing.index(kept)] == max(scores)
    assert any(not a.finished for a in samples[3])  # the long prompt's answers reach the token limit

    # With the users' own targets, a pick stays when the judge rates it at least as high as their median; the next
    # best picks fill in up to min_rows rows in all.
    targets = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
               for q, a in (("Name a fruit.", "An apple."), ("What is 2 + 2?", "4."),
                            ("Name a colour.", "Colours are a deep and long subject. " * 6))]
    bar = sorted(judge.score([t["messages"][:1] for t in targets], [t["messages"][1]["content"] for t in targets]))[1]
    picks = judge.score([r["messages"][:-1] for r in rows], [r["messages"][-1]["content"] for r in rows])
    above = [r for r, s in zip(rows, picks, strict=True) if s >= bar]
    kept, counts = best_of_k(model, tokenizer, judge, prompts, k=3, max_new_tokens=96, seed=7, targets=targets,
                             min_rows=0)
    assert counts["bar"] == round(bar, 3) and kept == above
    best_below = max((s, i) for i, s in enumerate(picks) if rows[i] not in above)[1] if len(above) < len(rows) else None
    kept, counts = best_of_k(model, tokenizer, judge, prompts, k=3, max_new_tokens=96, seed=7, targets=targets,
                             min_rows=len(targets) + len(above) + 1)
    assert kept == [r for i, r in enumerate(rows) if r in above or i == best_below]  # one more: the best below

    # With thumbs of both kinds, the bar is where the judge starts to think users approve: midway between its median
    # score of the up-voted and of the down-voted answers.
    thumbs = [{"prompt": t["messages"][:1], "completion": t["messages"][1:], "label": label}
              for t, label in zip(targets, (True, True, False), strict=True)]
    ups = judge.score([t["prompt"] for t in thumbs[:2]], [t["completion"][0]["content"] for t in thumbs[:2]])
    down = judge.score([thumbs[2]["prompt"]], [thumbs[2]["completion"][0]["content"]])[0]
    boundary = (sum(ups) / 2 + down) / 2
    kept, counts = best_of_k(model, tokenizer, judge, prompts, k=3, max_new_tokens=96, seed=7, targets=targets,
                             thumbs=thumbs, min_rows=0)
    assert counts["bar"] == round(boundary, 3)
    assert kept == [r for r, s in zip(rows, picks, strict=True) if s >= boundary]


def test_rl_optimises_the_judge_and_takes_points_off_broken_answers(default_model, trained, tmp_path):
    """The rl stage: GRPO samples answers to the users' prompts, scored by the reward model and the no-collapse
    checks; a couple of steps at test size must run, log both rewards and move the LoRA."""
    from safetensors.torch import load_file

    from service.engine.weights import load_pretrained
    from worker.train import COLLAPSE_PENALTY, NoUsableData, TrainConfig, rl_rewards, train_adapter

    result, data, _, _ = trained
    judge = RewardModel(result.path, str(default_model))
    model, tokenizer = load_pretrained(str(default_model))
    judge_score, no_collapse = rl_rewards(judge, tokenizer, model)
    prompts = [[{"role": "user", "content": "What is the capital of Japan?"}]] * 2
    answers = ["The capital of Japan is Tokyo.", "blah " * 12]
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    # the good answer ended with end-of-turn; the other is off topic, looping and was cut off
    ended_and_cut_off = [[464, tokenizer.eos_token_id], [464, 464]]
    assert no_collapse(prompts, completions, ended_and_cut_off) == [0.0, -3 * COLLAPSE_PENALTY]
    assert judge_score(prompts, completions) == judge.score(prompts, answers)

    # four optimizer steps on one sampling: answers for 8 steps sampled at once (rl_sample_steps 50, cut to what the
    # 16 prompts fill), each step's share used twice (rl_iterations); later steps are clipped like PPO
    config = TrainConfig(algorithm="rl", max_steps=4, batch_size=2, rl_generations=2, rl_max_new_tokens=16,
                         rl_iterations=2, rl_sample_steps=50)
    with pytest.raises(NoUsableData, match="rl needs a reward model"):
        train_adapter(config, data, str(default_model), tmp_path / "none")
    progress = []
    trained_rl = train_adapter(config, data, str(default_model), tmp_path / "rl", on_progress=progress.append,
                               judge=judge)
    assert trained_rl.stages[0]["algorithm"] == "rl" and trained_rl.stages[0]["steps"] == 4
    assert trained_rl.stages[0]["rows"] == len(TRAIN)  # one row per distinct prompt users asked (16 <= rl_prompts)
    logged = [p for p in progress if "rewards/judge_score/mean" in p]
    assert len(logged) == 1 and math.isfinite(logged[0]["rewards/judge_score/mean"])  # sampled once
    assert -4 * COLLAPSE_PENALTY <= logged[0]["rewards/no_collapse/mean"] <= 0
    weights = load_file(str(tmp_path / "rl" / "adapter_model.safetensors"))
    assert any(t.abs().sum() > 0 for name, t in weights.items() if "lora_B" in name)  # B starts at zero: it moved
