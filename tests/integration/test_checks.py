"""The no-collapse "on topic" rule with the base model's reading (worker/checks.py): short answers that do not
repeat the question pass, answers to another question and generic replies do not."""

from service.engine.weights import load_pretrained
from worker.checks import neutral_checks, with_relevance

QUESTIONS = [
    "Name four fruits that are high in vitamin C.",
    "List four ways to keep warm without turning up the heating.",
    "How do I repot a houseplant?",
    "What is the capital of Japan?",
    "How do I fix a flat tyre on a bicycle?",
    "Suggest five names for a black cat.",
]
ON_TOPIC = [  # none names a content word of its question
    "1. Oranges\n2. Kiwis\n3. Strawberries\n4. Guavas",
    "1. Wear a thick sweater\n2. Drink hot tea\n3. Use a blanket\n4. Close the curtains",
    "1. Choose a bigger pot. 2. Add fresh soil. 3. Move the plant and water it.",
    "Tokyo.",
    "Remove the wheel, find the hole in the inner tube, patch it and pump it up again.",
    "1. Luna\n2. Shadow\n3. Salem\n4. Midnight\n5. Onyx",
]


def test_short_answers_on_topic_pass_and_answers_to_other_questions_fail(default_model):
    model, tokenizer = load_pretrained(str(default_model))
    rules = [neutral_checks(q, a) for q, a in zip(QUESTIONS, ON_TOPIC, strict=True)]
    assert sum(c["on_topic"] for c in rules) <= 1  # the keyword rule alone calls them off topic

    read = with_relevance(model, tokenizer, QUESTIONS, ON_TOPIC, rules)
    assert all(c["on_topic"] for c in read), read
    assert [{k: v for k, v in c.items() if k != "on_topic"} for c in read] == \
        [{k: v for k, v in c.items() if k != "on_topic"} for c in rules]  # the other checks untouched

    moved = ON_TOPIC[3:] + ON_TOPIC[:3]  # each question gets another one's answer
    generic = ["I'm sorry, I can't help with that. Is there anything else I can do for you?"] * len(QUESTIONS)
    for answers in (moved, generic):
        rules = [neutral_checks(q, a) for q, a in zip(QUESTIONS, answers, strict=True)]
        read = with_relevance(model, tokenizer, QUESTIONS, answers, rules)
        assert sum(c["on_topic"] for c in read) <= 1, (answers, read)
    assert with_relevance(model, tokenizer, QUESTIONS[:1], ON_TOPIC[:1], rules[:1]) == rules[:1]  # nothing to compare
