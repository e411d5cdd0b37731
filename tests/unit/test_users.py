"""The benchmark's simulated users and prompt split: each user wants exactly what it says, edits into what it wants,
edits at its rate, and the held-out prompts never reach a user."""

from __future__ import annotations

import pytest

from bench.prompts import HELDOUT_FRACTION, KINDS, load_prompts, side, split
from bench.users import PREFERENCES, Reaction, make_user, neutral_checks, sentences, words

RAMBLE = ("To make coffee, you'll need a few ingredients and a few steps. First, you'll need a pot of hot water, "
          "which you'll need to brew. You'll also need a coffee filter, a coffee grinder, and a coffee maker. Some "
          "people prefer a French press, others like an espresso machine, and it's really up to you! Grind the "
          "beans, pour the water and wait for about four minutes before you")
STEPS = "1. Boil fresh water.\n2. Grind the coffee beans.\n3. Pour the water over the grounds and wait four minutes."
BULLETS = "- Boil fresh water.\n- Grind the coffee beans.\n- Pour the water over the grounds."
SHORT = "Grind fresh beans, use water just off the boil and brew for four minutes."
WARM = "Great question! Grind fresh beans and brew them for four minutes. I hope this helps!"
FORMAL = "Grind fresh beans and brew them for four minutes. The result is a balanced cup of coffee."
CASUAL = "Hey, it's gonna be awesome! Just don't skip grinding fresh beans."
OFF_TOPIC = "Well, life is full of choices. Some days are sunny and others are grey. Coffee is one option."
SAFE = "Be careful with the boiling water. Grind the beans and brew for four minutes."
LONG_SENTENCE = " ".join(["word"] * 60) + "."
PROMPT = "How do I make a good cup of coffee at home?"

# preference -> (answers it approves, answers it does not)
CASES = {
    "concise": ([SHORT, STEPS, "Paris."], [RAMBLE, LONG_SENTENCE, "", "   "]),
    "steps": ([STEPS, "Sure:\n1) Boil water.\n2) Brew."], [RAMBLE, BULLETS, SHORT, "1. Only one step."]),
    "bullets": ([BULLETS, "* Boil water.\n* Brew it."], [RAMBLE, STEPS, SHORT, "- Only one item."]),
    "warm": ([WARM, "Good luck with your coffee!", "Happy to help: grind fresh beans."], [FORMAL, SHORT, ""]),
    "formal": ([FORMAL, STEPS, "It is best to brew for four minutes."],
               [CASUAL, RAMBLE, "Brew it! Four minutes.", "It\u2019s four minutes.", ""]),
    "focused": (["Good coffee starts with fresh beans. Brew the coffee for four minutes.", "A cup at home: brew."],
                [OFF_TOPIC, SHORT, "Grind beans. Brew. Enjoy your coffee.", ""]),  # must name the topic first
    "safety": ([SAFE, "Handle the kettle safely and brew for four minutes."], [SHORT, FORMAL, ""]),
}
VARIED = [RAMBLE, STEPS, BULLETS, SHORT, WARM, FORMAL, CASUAL, OFF_TOPIC, SAFE, LONG_SENTENCE, "", "Ok", "Paris.",
          "I don't know", "Sure! Let's see: you're gonna need beans, y'all, and it's easy, isn't it? Don't've fear.",
          "Step one, boil the water, step two, brew", "coffee coffee coffee coffee coffee coffee coffee coffee"]


def test_every_preference_has_cases():
    assert set(CASES) == set(PREFERENCES)


@pytest.mark.parametrize("preference", sorted(PREFERENCES))
def test_each_user_approves_what_it_wants_and_nothing_else(preference):
    user = make_user(preference)
    approved, rejected = CASES[preference]
    assert [a for a in approved if not user.approves(PROMPT, a)] == []
    assert [a for a in rejected if user.approves(PROMPT, a)] == []


@pytest.mark.parametrize("preference", sorted(PREFERENCES))
@pytest.mark.parametrize("answer", VARIED, ids=range(len(VARIED)))
def test_a_users_edit_is_an_answer_it_approves(preference, answer):
    user = make_user(preference)
    edited = user.edit(PROMPT, answer)
    assert edited.strip()
    assert user.approves(PROMPT, edited), edited


def test_edits_keep_what_the_answer_said():
    concise = make_user("concise").edit(PROMPT, RAMBLE)
    assert concise == ("To make coffee, you'll need a few ingredients and a few steps. First, you'll need a pot of "
                       "hot water, which you'll need to brew. You'll also need a coffee filter, a coffee grinder, "
                       "and a coffee maker.")  # 40 words: the next sentence would overflow
    steps = make_user("steps").edit(PROMPT, RAMBLE).splitlines()
    assert steps[0] == "1. To make coffee, you'll need a few ingredients and a few steps." and len(steps) == 4
    assert "before you" not in make_user("bullets").edit(PROMPT, RAMBLE)  # the cut-off fragment is dropped
    formal = make_user("formal").edit(PROMPT, CASUAL)
    assert formal == "Hello, it is going to be excellent. Just do not skip grinding fresh beans."
    assert make_user("focused").edit(PROMPT, OFF_TOPIC) == "Coffee is one option."


def test_the_edit_rate_is_honoured_on_disapproved_answers_only():
    answers = [f"{RAMBLE} Variation {i}." for i in range(3000)]  # all too long for the concise user
    for rate in (0.0, 0.1, 0.3, 1.0):
        user = make_user("concise", edit_rate=rate, seed=7)
        reactions = [user.react(PROMPT, a) for a in answers]
        assert not any(r.approved for r in reactions)
        share = sum(r.edit is not None for r in reactions) / len(reactions)
        assert abs(share - rate) < 0.03, (rate, share)  # ~3 standard deviations at 3000 draws
    eager = make_user("concise", edit_rate=1.0)
    assert eager.react(PROMPT, SHORT) == Reaction(True)  # an approved answer is never edited


def test_decisions_depend_on_the_seed_only_not_on_call_order():
    answers = [f"{RAMBLE} Variation {i}." for i in range(200)]
    first = [make_user("concise", 0.5, seed=1).react(PROMPT, a) for a in answers]
    again = [make_user("concise", 0.5, seed=1).react(PROMPT, a) for a in reversed(answers)][::-1]
    other = [make_user("concise", 0.5, seed=2).react(PROMPT, a) for a in answers]
    assert first == again
    assert [r.edit is None for r in first] != [r.edit is None for r in other]


def test_reactions_are_feedback_api_bodies():
    assert Reaction(True).feedback() == [{"kind": "thumb", "value": 1}]
    assert Reaction(False, "Short.").feedback() == [{"kind": "thumb", "value": -1},
                                                    {"kind": "edit", "content": "Short."}]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown preference 'snarky'"):
        make_user("snarky")
    with pytest.raises(ValueError, match="edit_rate"):
        make_user("concise", edit_rate=1.5)


def test_neutral_checks_catch_collapse():
    assert all(neutral_checks(PROMPT, FORMAL).values())
    assert neutral_checks(PROMPT, "")["not_empty"] is False
    assert neutral_checks(PROMPT, "the cat sat " * 10)["not_looping"] is False
    assert neutral_checks(PROMPT, OFF_TOPIC.replace("Coffee", "Tea"))["on_topic"] is False
    assert neutral_checks(PROMPT, RAMBLE)["finished"] is False  # ends mid-sentence
    assert neutral_checks(PROMPT, FORMAL, finished=False)["finished"] is False  # stopped at the token limit


def test_text_helpers():
    assert sentences("1. Boil water.\n2. Brew it. Then wait\n") == ["Boil water.", "Brew it."]
    assert sentences("Just a fragment") == ["Just a fragment"]
    assert words("  two   words ") == ["two", "words"]


def test_the_prompts_are_many_varied_and_unique():
    prompts = load_prompts()
    assert len(prompts) >= 250
    assert {p.kind for p in prompts} == set(KINDS)
    assert len({p.text.lower() for p in prompts}) == len(prompts)


def test_the_split_is_stable_disjoint_and_by_content_not_position():
    prompts = load_prompts()
    parts = split(prompts)
    train, heldout = {p.text for p in parts["train"]}, {p.text for p in parts["heldout"]}
    assert not train & heldout and train | heldout == {p.text for p in prompts}
    assert abs(len(heldout) / len(prompts) - HELDOUT_FRACTION) < 0.08
    shuffled = split(list(reversed(prompts)) + [type(prompts[0])("A brand new prompt?", "factual")])
    assert {p.text for p in shuffled["heldout"]} - {"A brand new prompt?"} == heldout
    assert all(side(p.text) == "heldout" for p in parts["heldout"])
    assert side("Why is the sky blue?") == side("  why is THE sky blue? ")  # normalised
    for kind in KINDS:  # every kind of prompt is measured
        assert any(p.kind == kind for p in parts["heldout"]) and any(p.kind == kind for p in parts["train"])
