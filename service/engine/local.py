"""The local engine: transformers + peft in this process, CPU or GPU, with continuous batching.

One scheduler thread owns the model. Between decode steps it admits waiting requests (prefilled together, then
joined to the running batch), applies adapter loads and unloads, and drops rows that finished or whose client left.
Each step is one forward pass over every running row; rows may use different adapters (peft's per-row
``adapter_names``), so the base and several adapters share a batch. Tokens stream back through each request's
asyncio queue. This module knows nothing about users, the registry or HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future

import torch
from transformers import DynamicCache

from service.engine.adapters import adapter_fits, read_adapter_files
from service.engine.base import (
    BASE,
    AdapterLoadError,
    AdapterNotLoaded,
    Chunk,
    EngineHealth,
    EngineOverloaded,
    GenerationRequest,
    PromptTooLong,
)
from service.engine.batch import KVBatch, prefill_inputs
from service.engine.sequence import Sequence, sample
from service.engine.weights import load_pretrained, stop_token_ids

log = logging.getLogger(__name__)
# transformers 5.24 renames past_key_values to cache; the old name keeps vLLM's pinned transformers (<5.21) working.
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
PEFT_BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class LocalEngine:
    def __init__(self, model_path: str, *, device: str = "auto", dtype: str = "auto", max_batch_size: int = 16,
                 max_loaded_adapters: int = 8, max_tokens_default: int = 512, max_queued: int = 256):
        self.model_name = model_path
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.dtype = ("bfloat16" if self.device == "cuda" else "float32") if dtype == "auto" else dtype
        self.max_batch_size, self.max_loaded_adapters = max_batch_size, max_loaded_adapters
        self.max_tokens_default, self.max_queued = max_tokens_default, max_queued
        self.context_length = 0
        self.model = self.tokenizer = None
        self._peft = None  # the PeftModel, once the first adapter is loaded
        self._adapters: OrderedDict[str, str] = OrderedDict()  # name -> path, least recently used first
        self._pinned: set[str] = set()
        self._draining: set[str] = set()
        self._name_locks: dict[str, asyncio.Lock] = {}
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._admitting: list[Sequence] = []  # taken from the queue, not yet in the batch
        self._batch = KVBatch()
        self._commands: deque[tuple[Callable[[], object], Future]] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._error: str = ""

    # --- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.model, self.tokenizer = await asyncio.to_thread(load_pretrained, self.model_name, self.device,
                                                             self.dtype)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self._eos_ids = stop_token_ids(self.model, self.tokenizer)
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self._eos_ids)
        self._thread = threading.Thread(target=self._run, name="flywheel-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread:
            await asyncio.to_thread(self._thread.join, 30)

    # --- requests --------------------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if request.adapter != BASE and (request.adapter not in self._adapters or request.adapter in self._draining):
            raise AdapterNotLoaded(f"adapter {request.adapter} is not loaded")
        prompt = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
        room = self.context_length - len(prompt)
        max_tokens = request.sampling.max_tokens or min(self.max_tokens_default, room)
        if max_tokens > room or room <= 0:
            raise PromptTooLong(len(prompt), max_tokens, self.context_length)
        loop = asyncio.get_running_loop()
        seq = Sequence(request.request_id, request.adapter, prompt, request.sampling, max_tokens, loop,
                       asyncio.Queue())
        with self._wake:
            if len(self._waiting) >= self.max_queued:
                raise EngineOverloaded(f"{len(self._waiting)} requests are already waiting; retry shortly")
            self._waiting.append(seq)
            self._wake.notify()
        try:
            while True:
                chunk = await seq.out.get()
                yield chunk
                if chunk.finish_reason:
                    return
        finally:
            seq.cancelled = True  # a no-op when finished; otherwise the client left: free the slot next step

    # --- adapters --------------------------------------------------------------------------------------------
    def loaded(self) -> set[str]:
        return set(self._adapters) - self._draining

    def pin(self, names: set[str]) -> None:
        self._pinned = set(names)

    async def load_adapter(self, name: str, path: str, sha256: str | None = None) -> None:
        if name in (BASE, PEFT_BASE):
            raise AdapterLoadError(f"{name} is reserved for the base model")
        async with self._name_locks.setdefault(name, asyncio.Lock()):
            if name in self._adapters and name not in self._draining:
                return
            weights, config = await asyncio.to_thread(read_adapter_files, path, sha256)
            await self._call(lambda: self._load(name, path, weights, config))
            log.info("loaded adapter %s from %s", name, path)

    async def unload_adapter(self, name: str) -> None:
        # Under the name's lock, so a load of the same name asked for meanwhile waits and then loads it afresh.
        async with self._name_locks.setdefault(name, asyncio.Lock()):
            if name not in self._adapters:
                return
            self._draining.add(name)
            try:
                await self._call(lambda: self._unload_when_idle(name))
            finally:
                self._draining.discard(name)
            log.info("unloaded adapter %s", name)

    def health(self) -> EngineHealth:
        ok = self._thread is not None and self._thread.is_alive() and not self._error
        return EngineHealth(ok=ok, model=self.model_name, loaded_adapters=sorted(self._adapters),
                            queue_depth=len(self._waiting), running=len(self._running), detail=self._error)

    async def _call(self, command: Callable[[], object]):
        """Run ``command`` on the scheduler thread between two steps; wait for its result."""
        future: Future = Future()
        with self._wake:
            self._commands.append((command, future))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    # --- scheduler thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._stopped or self._waiting or self._running or self._commands):
                        self._wake.wait()
                    if self._stopped:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                try:
                    self._run_commands(commands)
                    self._admit()
                    if self._running:
                        self._decode()
                except Exception as exc:  # noqa: BLE001 - fail the requests in flight, keep serving
                    log.exception("engine step failed")
                    self._error = f"{type(exc).__name__}: {exc}"
                    for seq in [*self._running, *self._admitting]:
                        seq.send(Chunk("", "abort", len(seq.prompt), len(seq.tokens)))
                    self._running, self._admitting, self._batch = [], [], KVBatch()
                else:
                    self._error = ""
        for seq in [*self._running, *self._waiting]:
            seq.send(Chunk("", "abort", len(seq.prompt), len(seq.tokens)))

    def _run_commands(self, commands: list[tuple[Callable[[], object], Future]]) -> None:
        for command, future in commands:
            try:
                result = command()
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
                continue
            if result is _NOT_YET:  # e.g. an unload waiting for its requests: try again next step
                with self._wake:
                    self._commands.append((command, future))
            else:
                future.set_result(result)

    def _admit(self) -> None:
        self._drop_cancelled()
        room = self.max_batch_size - len(self._running)
        with self._wake:
            new = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        new = self._admitting = [s for s in new if not s.cancelled]
        if not new:
            return
        for seq in new:
            if seq.adapter in self._adapters:
                self._adapters.move_to_end(seq.adapter)
        ids, mask, positions = prefill_inputs([s.prompt for s in new], self._pad_id, self.model.device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(new, input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        self._batch.join(cache, mask)
        self._running.extend(new)
        self._admitting = []
        self._advance(new, logits)

    def _decode(self) -> None:
        mask, positions = self._batch.step_inputs()
        last = torch.tensor([[s.tokens[-1]] for s in self._running], device=self.model.device)
        logits = self._forward(self._running, input_ids=last, attention_mask=mask, position_ids=positions,
                               past_key_values=self._batch.cache)
        self._advance(self._running, logits)

    def _forward(self, rows: list[Sequence], **inputs) -> torch.Tensor:
        """Last-position logits, applying the rows' adapters the cheapest way: none, one for all, or per row."""
        inputs.update(use_cache=True, logits_to_keep=1)
        adapters = {s.adapter for s in rows}
        if self._peft is None:
            return self.model(**inputs).logits[:, -1, :]
        if len(adapters) == 1 and BASE not in adapters:
            (name,) = adapters
            if self._peft.active_adapter != name:
                self._peft.set_adapter(name)
            return self._peft(**inputs).logits[:, -1, :]
        # Base rows too: peft's disable_adapter() walks every module twice a step, slower than letting its LoRA
        # layers skip "__base__" rows (bench/gpu.py: base / 1-adapter throughput on an H200 0.43 -> 0.56).
        names = [PEFT_BASE if s.adapter == BASE else s.adapter for s in rows]
        return self._peft(**inputs, adapter_names=names).logits[:, -1, :]

    def _advance(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        for seq, token in zip(rows, sample(logits, rows), strict=True):
            text = self.tokenizer.decode(seq.tokens + [token], skip_special_tokens=True)
            seq.advance(token, text, self._eos_ids)
        self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not (s.cancelled or s.finish)]
        if len(keep) != len(self._running):
            self._running = [self._running[i] for i in keep]
            self._batch.keep(keep)

    def _load(self, name: str, path: str, weights: dict[str, torch.Tensor], config) -> None:
        from peft import PeftModel, set_peft_model_state_dict

        problem = adapter_fits(self.model if self._peft is None else self._peft.get_base_model(), weights, config)
        if problem:
            raise AdapterLoadError(f"adapter {name} does not fit the base model: {problem}")
        self._make_room()
        try:
            if self._peft is None:
                self._peft = PeftModel(self.model, config, adapter_name=name)
            else:
                self._peft.add_adapter(name, config)
            missing = set_peft_model_state_dict(self._peft, weights, adapter_name=name)
            if getattr(missing, "unexpected_keys", None):
                raise AdapterLoadError(f"adapter {name} has weights the model has no place for: "
                                       f"{missing.unexpected_keys[:3]}")
            self._peft.to(self.model.device)
            self._peft.eval()
        except Exception as exc:
            if self._peft is not None and name in self._peft.peft_config:
                self._peft.delete_adapter(name)
            raise exc if isinstance(exc, AdapterLoadError) else AdapterLoadError(f"adapter {name}: {exc}") from exc
        self._adapters[name] = path

    def _make_room(self) -> None:
        if len(self._adapters) < self.max_loaded_adapters:
            return
        busy = {s.adapter for s in [*self._running, *self._waiting]} | self._pinned
        victim = next((n for n in self._adapters if n not in busy), None)
        if victim is None:
            raise AdapterLoadError(f"{len(self._adapters)} adapters are loaded (FLYWHEEL_MAX_LOADED_ADAPTERS) and "
                                   "all are pinned or in use")
        self._delete(victim)
        log.info("evicted adapter %s (least recently used)", victim)

    def _unload_when_idle(self, name: str):
        if name not in self._adapters:
            return None
        if any(s.adapter == name for s in [*self._running, *self._waiting]):
            return _NOT_YET
        self._delete(name)
        return None

    def _delete(self, name: str) -> None:
        del self._adapters[name]
        if self._adapters:
            self._peft.delete_adapter(name)
        else:  # the last one: give back the plain base model (peft keeps no "no adapter" state)
            self.model, self._peft = self._peft.unload(), None


_NOT_YET = object()
