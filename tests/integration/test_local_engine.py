"""The local engine in-process on the default model: sampling knobs, adapter lifecycle, limits."""

from __future__ import annotations

import asyncio

import pytest

from service.adapters.files import adapter_digest
from service.engine.base import AdapterLoadError, AdapterNotLoaded, GenerationRequest, PromptTooLong, SamplingParams
from service.engine.local import LocalEngine

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture
async def engine(default_model):
    engine = LocalEngine(str(default_model), max_loaded_adapters=2)
    await engine.start()
    yield engine
    await engine.stop()


async def _answer(engine, adapter="base", messages=QUESTION, **sampling):
    sampling = {"max_tokens": 16, "temperature": 0.0, **sampling}
    text, last = "", None
    async for chunk in engine.generate(GenerationRequest("t", messages, SamplingParams(**sampling), adapter)):
        text, last = text + chunk.text, chunk
    return text, last


async def test_seed_makes_sampling_repeatable_and_stop_sequences_cut(engine):
    first, _ = await _answer(engine, temperature=1.0, seed=7)
    again, _ = await _answer(engine, temperature=1.0, seed=7)
    other, _ = await _answer(engine, temperature=1.0, seed=8)
    assert first == again and first != other

    counted, last = await _answer(engine, messages=[{"role": "user", "content": "Count from 1 to 10."}],
                                  max_tokens=60, stop=("5",))
    assert "5" not in counted and "4" in counted and last.finish_reason == "stop"

    whole, last = await _answer(engine, max_tokens=5, ignore_eos=True)
    assert last.finish_reason == "length" and last.completion_tokens == 5 and last.prompt_tokens > 10


async def test_a_prompt_longer_than_the_context_is_refused(engine):
    long = [{"role": "user", "content": "sea " * (engine.context_length + 10)}]
    with pytest.raises(PromptTooLong, match="exceeds the model's context"):
        await _answer(engine, messages=long)
    with pytest.raises(PromptTooLong):
        await _answer(engine, max_tokens=engine.context_length)


async def test_adapters_load_idempotently_evict_least_recently_used_and_keep_pinned(engine, lora_adapters, tmp_path):
    a, b = (str(p) for p in lora_adapters)
    sha_a, _ = adapter_digest(a)
    await engine.load_adapter("a", a, sha_a)
    await engine.load_adapter("a", a, sha_a)  # a no-op
    with pytest.raises(AdapterLoadError, match="fails its checksum"):
        await engine.load_adapter("wrong-sum", b, sha_a)
    await engine.load_adapter("b", b)
    assert engine.loaded() == {"a", "b"}

    engine.pin({"a"})
    await engine.load_adapter("c", b)  # the cap is 2: b, not the pinned a, makes room
    assert engine.loaded() == {"a", "c"}
    engine.pin({"a", "c"})
    with pytest.raises(AdapterLoadError, match="pinned or in use"):
        await engine.load_adapter("d", b)
    with pytest.raises(AdapterNotLoaded):
        await _answer(engine, adapter="b")
    with pytest.raises(AdapterLoadError, match="reserved"):
        await engine.load_adapter("base", b)


async def test_unload_waits_for_the_requests_in_flight(engine, lora_adapters):
    await engine.load_adapter("a", str(lora_adapters[0]))
    alone, _ = await _answer(engine, adapter="a", max_tokens=40, ignore_eos=True)
    answering = asyncio.create_task(_answer(engine, adapter="a", max_tokens=40, ignore_eos=True))
    await asyncio.sleep(0.3)  # the request is decoding
    await engine.unload_adapter("a")
    assert answering.done()  # unload returned only after the request finished...
    text, last = answering.result()
    assert text == alone and last.completion_tokens == 40  # ...on the adapter it started with
    assert engine.loaded() == set()
    await engine.unload_adapter("a")  # unloading a gone adapter is a no-op
    text, _ = await _answer(engine)  # the base keeps serving
    assert text
