"""The worker's own generation (worker/sampling.py): rows leave the batch when they finish and waiting ones join,
and no answer may differ for it."""

import threading
import time

import pytest
import torch

from service.engine.weights import load_pretrained, stop_token_ids
from worker.sampling import generate, load_sampler, sampling_dtype
from worker.train import Cancelled

PROMPTS = [
    [{"role": "user", "content": "What is the capital of Japan?"}],
    [{"role": "user", "content": "Explain in detail how a refrigerator keeps food cold."}],
    [{"role": "user", "content": "Say hi."}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
     {"role": "user", "content": "And a vegetable?"}],
    [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
]


def test_greedy_answers_are_what_the_model_writes_for_each_prompt_alone(default_model):
    model, tokenizer = load_pretrained(str(default_model))
    stop_ids = stop_token_ids(model, tokenizer)
    answers = generate(model, tokenizer, PROMPTS, max_new_tokens=40, batch_size=3)  # 5 prompts through 3 rows

    finished = []
    for prompt, (answer,) in zip(PROMPTS, answers, strict=True):
        inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=40, do_sample=False, temperature=None, top_p=None,
                                    top_k=None, eos_token_id=list(stop_ids))
        new = output[0, inputs["input_ids"].shape[1]:].tolist()
        ended = new[-1] in stop_ids
        assert answer.finished == ended
        assert answer.text == tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True).strip()
        finished.append(ended)
    assert any(finished) and not all(finished)  # rows left early and rows ran to the limit


def test_k_sampled_answers_per_prompt_reproducible_by_seed(default_model):
    model, tokenizer = load_pretrained(str(default_model))
    kwargs = dict(max_new_tokens=24, k=4, temperature=0.9, batch_size=6)
    first = generate(model, tokenizer, PROMPTS, seed=3, **kwargs)
    assert [len(answers) for answers in first] == [4] * len(PROMPTS)
    assert all(answer.text for answers in first for answer in answers)
    assert all(len({a.text for a in answers}) > 1 for answers in first[1:2] + first[4:])  # open prompts vary
    assert generate(model, tokenizer, PROMPTS, seed=3, **kwargs) == first
    assert generate(model, tokenizer, PROMPTS, seed=4, **kwargs) != first


def test_best_of_k_samples_from_what_serves_with_the_adapter_merged(default_model, lora_adapters):
    from peft import PeftModel

    model, tokenizer = load_sampler(str(default_model), str(lora_adapters[0]))
    assert not isinstance(model, PeftModel) and model.dtype == getattr(torch, sampling_dtype())
    served = PeftModel.from_pretrained(load_pretrained(str(default_model))[0], str(lora_adapters[0])).eval()
    base = load_pretrained(str(default_model))[0]
    inputs = tokenizer.apply_chat_template(PROMPTS[1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.inference_mode():
        logits = [m(**inputs).logits[0, -1].float() for m in (model, served, base)]
    merged_vs_served = (logits[0] - logits[1]).abs().max()
    assert merged_vs_served < 0.1 * (logits[1] - logits[2]).abs().max()  # the adapter's effect, not the base's
    assert set(logits[0].topk(5).indices.tolist()) == set(logits[1].topk(5).indices.tolist())  # bfloat16: ties
    assert logits[0].argmax() == logits[1].argmax() != logits[2].argmax()


class _StopAfter(threading.Event):
    """An event that reads as set from its ``n``-th check on: a stop that arrives mid-generation."""

    def __init__(self, n: int):
        super().__init__()
        self.checks, self.n = 0, n

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks >= self.n


def test_generation_stops_between_steps_and_starts_nothing_after_its_deadline(default_model):
    model, tokenizer = load_pretrained(str(default_model))
    stop = _StopAfter(5)
    with pytest.raises(Cancelled):
        generate(model, tokenizer, PROMPTS, max_new_tokens=40, batch_size=3, stop=stop)
    assert stop.checks == 5  # it stopped at the fifth step, not after all of them

    kwargs = dict(max_new_tokens=24, k=4, temperature=0.9, batch_size=6, seed=3)
    assert generate(model, tokenizer, PROMPTS, deadline=time.monotonic() - 1, **kwargs) == [[]] * len(PROMPTS)
    late = generate(model, tokenizer, PROMPTS, deadline=time.monotonic() + 3600, **kwargs)
    assert late == generate(model, tokenizer, PROMPTS, **kwargs)  # a deadline not reached changes nothing
