"""What every answer should pass whatever users prefer: the no-collapse checks of the gate and the benchmark.

A LoRA pushed hard toward one taste (shorter, warmer, in bullets) can break answers in ways its users' votes never
mention: empty replies, loops, answers cut off mid-word, answers about something else. These rules are plain
on purpose, so that a regression is obvious from the answer itself.
"""

from __future__ import annotations

import re

_STOPWORDS = """a an and are as at be best can could do does for from good have how i if in is it its me my of on
or should so some that the their there these this to was we what when where which who why will with would you your
any about into than then them they just give tell name list explain make get keep use way ways much many need want
there's what's it's i'm don't without ever never"""
STOPWORDS = frozenset(_STOPWORDS.split())
CHECKS = ("not_empty", "on_topic", "not_looping", "finished")
FINISHED_END = re.compile(r"[.!?)\]\"'*:]\s*$")  # how a finished answer ends: a sentence, a bracket, a quote
_SENTENCE_END = re.compile(r"[.!?)\]\"'*:](?=\s)")
_LIST_NUMBER = re.compile(r"(?:^|\s)\d{1,2}\.$")  # "2." opens a list item: not a sentence end


def neutral_checks(prompt: str, answer: str, finished: bool = True) -> dict[str, bool]:
    """One verdict per check in CHECKS; ``finished`` is False when generation stopped at its token limit."""
    tokens = [w.lower() for w in words(answer)]
    trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
    looping = len(trigrams) >= 6 and len(set(trigrams)) < 0.5 * len(trigrams)
    return {"not_empty": bool(tokens), "on_topic": not keywords(prompt) or mentions(prompt, answer),
            "not_looping": not looping, "finished": finished and bool(FINISHED_END.search(answer))}


def complete_part(answer: str, min_share: float = 0.5) -> str:
    """``answer`` (stripped) if it ends finished, else cut after its last complete sentence or list item; "" when
    that keeps less than ``min_share`` of its words.

    Why: the default model writes long answers, and sampled ones often stop at the token limit: all 11 of 64 that
    a numbered-steps user approved were cut off at 128 tokens, and 12 of 22 for a focused one (bench/imitable.py).
    Dropping them left nothing to imitate; what precedes the cut is what the user approved, and it ends cleanly:
    10 and 22 of them then passed the no-collapse checks, every one still approved by its user."""
    answer = answer.strip()
    if FINISHED_END.search(answer):
        return answer
    ends = [m.end() for m in _SENTENCE_END.finditer(answer) if not _LIST_NUMBER.search(answer[:m.end()])]
    part = answer[:ends[-1]].strip() if ends else ""
    return part if len(words(part)) >= min_share * len(words(answer)) else ""


def pass_rates(checked: list[dict[str, bool]]) -> dict[str, float]:
    """Share of answers passing each check (1.0 each when there are none)."""
    return {name: sum(c[name] for c in checked) / len(checked) if checked else 1.0 for name in CHECKS}


def words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def keywords(prompt: str) -> list[str]:
    """The content words of a prompt, in order: what an answer on topic mentions."""
    found = [w for w in re.findall(r"[a-z][a-z'-]+", prompt.lower()) if len(w) >= 3 and w not in STOPWORDS]
    return list(dict.fromkeys(found))


def mentions(prompt: str, text: str) -> bool:
    """Whether ``text`` names one of the prompt's keywords (compared on their first five letters)."""
    stems = {k[:5] for k in keywords(prompt)}
    return any(w[:5] in stems for w in re.findall(r"[a-z][a-z'-]+", text.lower()))


RELEVANCE_OTHERS = 4  # other questions an answer is compared under
RELEVANCE_MARGIN = 3.0  # nats its own question must explain it better by ("Tokyo." passes: test_checks.py)


def with_relevance(model, tokenizer, questions: list[str], answers: list[str], checked: list[dict[str, bool]]
                   ) -> list[dict[str, bool]]:
    """``checked`` (neutral_checks of each answer), where a non-empty answer the keyword rule called off topic
    passes when ``model`` (the base: one fixed instrument) finds it at least RELEVANCE_MARGIN nats likelier after its
    own question than after each of the RELEVANCE_OTHERS next questions of the list.

    Why: short answers need not repeat the question ("1. Oranges 2. Kiwis" to "Name four fruits high in vitamin C"):
    the keyword rule failed 8 of 48 answers of a concise model, 6 of them on topic. bench/on_topic.py measures both
    rules on a run's stored answers and on answers given to other questions, which must fail."""
    out = [dict(c) for c in checked]
    tests = []  # (answer index, its question and the others it is compared under)
    for i, (question, verdict) in enumerate(zip(questions, out, strict=True)):
        others = list(dict.fromkeys(q for q in questions[i + 1:] + questions[:i] if q != question))
        if not verdict["on_topic"] and verdict["not_empty"] and others:
            tests.append((i, [question, *others[:RELEVANCE_OTHERS]]))
    scores = iter(answer_logprobs(model, tokenizer, [(q, answers[i]) for i, asked in tests for q in asked]))
    for i, asked in tests:
        own, *elsewhere = [next(scores) for _ in asked]
        out[i]["on_topic"] = all(own - other >= RELEVANCE_MARGIN for other in elsewhere)
    return out


def answer_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 16) -> list[float]:
    """log p(answer | question) under ``model`` for each (question, answer), on its first 64 answer tokens (enough
    to say what it is about), in padded batches."""
    import torch

    rows = []
    for question, answer in pairs:
        context = list(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                     add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
        rows.append((context, tokenizer(answer, add_special_tokens=False)["input_ids"][:64]))
    scores = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(len(c) + len(a) for c, a in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            scored = torch.zeros(len(chunk), width - 1, dtype=torch.bool)  # which next-token predictions count
            for row, (context, answer) in enumerate(chunk):
                ids[row, :len(context) + len(answer)] = torch.tensor(context + answer)
                mask[row, :len(context) + len(answer)] = 1
                scored[row, len(context) - 1:len(context) + len(answer) - 1] = True
            ids, mask = ids.to(model.device), mask.to(model.device)
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            token = logp.gather(-1, ids[:, 1:, None])[..., 0]
            scores += (token * scored.to(model.device)).sum(-1).tolist()
    return scores
