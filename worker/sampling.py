"""Answers generated inside the worker: greedy ones for the gate's behaviour check, sampled ones for best-of-k.

Best-of-k (rejection sampling) is how thumbs alone move behaviour: most feedback is a thumb, and a few approved
answers are little to imitate (shared/probes/learning.md). So the worker samples k answers per training prompt
from the model being improved, lets the reward model trained on the votes pick the best, and the SFT stage learns
those. Only answers that pass the no-collapse checks are candidates: imitating a truncated or looping answer
would teach exactly that. A sample cut off at the token limit competes by its complete part (what precedes the
cut, ending at a sentence), as most of the default model's answers for any preference but length are cut off.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from worker.checks import complete_part, neutral_checks

Conversation = list[dict]
SAMPLE_TEMPERATURE = 0.9  # for best-of-k and rl: answers varied enough to compare, still on topic
MIN_SFT_ROWS = 16  # best-of-k fills SFT up to this many rows: 18 users' edits and approved answers learned well


@dataclass
class Answer:
    text: str
    finished: bool  # ended with end-of-turn, not at the token limit


def device() -> str:
    """Where the worker's own generation and scoring run: the GPU when there is one (the trainers pick it too)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sampling_dtype() -> str:
    """The dtype best-of-k samples in: bfloat16 where its matmuls are native (a GPU, a CPU with AMX tiles), where
    it sampled 0.62x the time of float32 (16 prompts x 8 samples on a 2-core AMX CPU); float32 where bfloat16 is
    emulated. Samples are only candidates the judge ranks; the gate's greedy answers stay in float32, as served."""
    import torch

    if torch.cuda.is_available():
        return "bfloat16"
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)  # private in torch 2.13; absent: assume none
    return "bfloat16" if amx() else "float32"


def load_sampler(base_model: str, adapter: str | None = None):
    """(model, tokenizer) best-of-k samples from: the base model with ``adapter`` (what serves) merged into its
    float32 weights, then cast to ``sampling_dtype()``, on ``device()``. Merged, no LoRA layer runs beside each
    projection: sampling from a round's adapter took 0.84x the time of the unmerged float32 model (0.92x of the
    unmerged bfloat16 one)."""
    import torch

    from service.engine.weights import load_pretrained

    model, tokenizer = load_pretrained(base_model, device=device())
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.to(getattr(torch, sampling_dtype())).eval(), tokenizer


def generate(model, tokenizer, prompts: Sequence[Conversation], *, max_new_tokens: int, k: int = 1,
             temperature: float = 0.0, batch_size: int = 64, seed: int = 0, deadline: float | None = None,
             stop: threading.Event | None = None) -> list[list[Answer]]:
    """``k`` answers per prompt (greedy when temperature is 0); the model's current adapter writes them. Once
    ``time.monotonic()`` passes ``deadline`` no answer starts and those under way finish, so a prompt may get fewer
    than ``k`` (none if it never started; prompts start shortest first). ``stop`` set: Cancelled, between steps.

    Continuously batched with the engine's KV batch (service/engine/batch.py): a finished answer leaves the batch
    and a waiting one takes its row, where ``model.generate`` decodes every row until the longest of ``batch_size``
    ends (nearly always the token limit when sampling k answers). Greedy answers are the same; it took 0.89-0.95x
    the time (bench/sampling.py, 2-core CPU: the last rows still run to the limit)."""
    import torch
    from transformers import DynamicCache

    from service.engine.batch import KVBatch, prefill_inputs
    from service.engine.weights import stop_token_ids

    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    ids = [list(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)
                ["input_ids"]) for p in prompts]
    waiting = deque(i for i in sorted(range(len(ids)), key=lambda i: len(ids[i])) for _ in range(k))
    running: list[tuple[int, list[int]]] = []  # (prompt index, answer tokens so far), in batch row order
    out: list[list[Answer]] = [[] for _ in ids]
    batch = KVBatch()
    draw = torch.Generator(device=model.device).manual_seed(seed)
    with torch.inference_mode():
        while waiting or running:
            if stop is not None and stop.is_set():
                from worker.train import Cancelled

                raise Cancelled("the run was stopped while the worker generated answers")
            if deadline is not None and waiting and time.monotonic() > deadline:
                waiting.clear()
                if not running:
                    break
            room = batch_size - len(running)
            if waiting and room >= min(max(1, batch_size // 4), len(waiting)):  # prefill a few rows at once
                new = [(waiting.popleft(), []) for _ in range(min(room, len(waiting)))]
                inputs, mask, positions = prefill_inputs([ids[i] for i, _ in new], pad_id, model.device)
                cache = DynamicCache(config=model.config)
                logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions, past_key_values=cache,
                               use_cache=True, logits_to_keep=1).logits[:, -1]
                batch.join(cache, mask)
                stepped, running = new, running + new
            else:
                mask, positions = batch.step_inputs()
                last = torch.tensor([[tokens[-1]] for _, tokens in running], device=model.device)
                logits = model(input_ids=last, attention_mask=mask, position_ids=positions,
                               past_key_values=batch.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
                stepped = running
            if temperature > 0:
                chosen = torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1, generator=draw)
            else:
                chosen = logits.argmax(dim=-1, keepdim=True)
            for (_, tokens), token in zip(stepped, chosen[:, 0].tolist(), strict=True):
                tokens.append(token)
            keep = []
            for row, (i, tokens) in enumerate(running):
                ended = tokens[-1] in stop_ids
                if ended or len(tokens) >= max_new_tokens:
                    text = tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)
                    out[i].append(Answer(text.strip(), ended))
                else:
                    keep.append(row)
            running = [running[row] for row in keep]
            batch.keep(keep)
    return out


def unique_prompts(rows: Sequence[dict], limit: int | None = None) -> list[Conversation]:
    """The distinct contexts of export rows (sft rows carry theirs in ``messages``): the last ``limit`` of them, since
    export rows come oldest first and what users ask now matters most."""
    seen: dict[str, Conversation] = {}
    for row in rows:
        prompt = context(row)
        key = json.dumps(prompt, sort_keys=True)
        seen.pop(key, None)  # a prompt seen again counts as recent
        seen[key] = prompt
    return list(seen.values())[-limit:] if limit is not None else list(seen.values())


def context(row: dict) -> Conversation:
    """The conversation an export row's answer replies to."""
    return row["prompt"] if "prompt" in row else row["messages"][:-1]


def newest_training_prompts(data, limit: int, targeted: Sequence[dict] = ()) -> list[Conversation]:
    """The newest ``limit`` distinct contexts users asked in ``data``'s (a TrainingData) training split, for best-of-k
    and rl, leaving out those of the ``targeted`` rows. Thumbs last: they come with nearly every rated answer, in time
    order, so the newest prompts are kept."""
    skip = {json.dumps(context(row), sort_keys=True) for row in targeted}
    prompts = unique_prompts(data.dpo.train + data.sft.train + data.kto.train)
    return [p for p in prompts if json.dumps(p, sort_keys=True) not in skip][-limit:]


def prompts_to_sample(data, limit: int, targets: Sequence[dict], min_rows: int = MIN_SFT_ROWS) -> list[Conversation]:
    """Best-of-k's prompts: none once users' own ``targets`` make ``min_rows`` SFT rows, else the newest ``limit``
    prompts users left without one. Picks are the judge's guess at what users want: beside 27 users' targets (30%
    edits, formal) 24 picks took held-out approval from 83% to 73% (steps: 85% replayed without them, 58% in the
    round with them), and sampling them was the round's longest stage (360 s of 750-800)."""
    if len(targets) >= min_rows:
        return []
    return newest_training_prompts(data, limit, targeted=targets)


@dataclass
class Pick:
    prompt: Conversation
    answer: str
    score: float  # the judge's


def judged_picks(model, tokenizer, judge, prompts: Sequence[Conversation], *, k: int, max_new_tokens: int,
                 temperature: float = SAMPLE_TEMPERATURE, seed: int = 0, deadline: float | None = None,
                 stop: threading.Event | None = None) -> tuple[list[Pick], dict]:
    """The judge's favourite of ``k`` sampled answers to each prompt, best first, and counts. Each answer competes
    by its complete part (``complete_part``: all of it when it ends finished), if that passes the no-collapse checks; a
    prompt with none has no pick (``deadline``, ``stop``: ``generate``)."""
    started = time.monotonic()
    samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, k=k, temperature=temperature,
                       seed=seed, deadline=deadline, stop=stop)
    sampled = time.monotonic()
    flat = []  # (prompt index, the part of a sample that competes, whether it was cut off)
    for i, (prompt, answers) in enumerate(zip(prompts, samples, strict=True)):
        for a in answers:
            part = complete_part(a.text)
            if part and all(neutral_checks(last_user_turn(prompt), part).values()):
                flat.append((i, part, not a.finished))
    scores = judge.score([prompts[i] for i, _, _ in flat], [part for _, part, _ in flat]) if flat else []
    best: dict[int, Pick] = {}
    for (i, part, _), score in zip(flat, scores, strict=True):
        if i not in best or score > best[i].score:
            best[i] = Pick(prompts[i], part, score)
    picks = sorted(best.values(), key=lambda pick: -pick.score)
    return picks, {"prompts": len(prompts), "prompts_sampled": sum(1 for answers in samples if answers),
                   "samples": sum(map(len, samples)), "usable_samples": len(flat),
                   "usable_cut_off": sum(cut for _, _, cut in flat),
                   "sample_seconds": round(sampled - started, 1), "judge_seconds": round(time.monotonic() - sampled, 1)}


def pick_rows(picks: Sequence[Pick], bar: float | None, *, targets: int, min_rows: int = MIN_SFT_ROWS
              ) -> tuple[list[dict], dict]:
    """SFT rows of the picks (best first) that score at least ``bar``; when ``targets`` (the users' own rows) and
    those are fewer than ``min_rows``, the next best picks fill in."""
    above = [p for p in picks if bar is None or p.score >= bar]
    fill = [p for p in picks if p not in above][:max(0, min_rows - targets - len(above))]
    rows = [{"messages": [*p.prompt, {"role": "assistant", "content": p.answer}]} for p in above + fill]
    return rows, {"bar": None if bar is None else round(bar, 3), "above_bar": len(above), "rows": len(rows)}


def targets_bar(judge, targets: Sequence[dict]) -> float | None:
    """The median judge score of the users' own SFT rows (edits, approved answers); None without any."""
    if not targets:
        return None
    return statistics.median(judge.score([r["messages"][:-1] for r in targets],
                                         [r["messages"][-1]["content"] for r in targets]))


def boundary_bar(judge, thumbs: Sequence[dict]) -> float | None:
    """Midway between the judge's median score of up-voted and of down-voted answers (KTO rows): where it starts to
    think users approve. None without both kinds."""
    ups = [r for r in thumbs if r["label"]]
    downs = [r for r in thumbs if not r["label"]]
    if not (ups and downs):
        return None

    def median(rows):
        return statistics.median(judge.score([r["prompt"] for r in rows], [r["completion"][-1]["content"]
                                                                           for r in rows]))

    return (median(ups) + median(downs)) / 2


def best_of_k(model, tokenizer, judge, prompts: Sequence[Conversation], *, k: int, max_new_tokens: int,
              targets: Sequence[dict] = (), thumbs: Sequence[dict] = (), min_rows: int = MIN_SFT_ROWS,
              temperature: float = SAMPLE_TEMPERATURE, seed: int = 0, deadline: float | None = None,
              stop: threading.Event | None = None) -> tuple[list[dict], dict]:
    """SFT rows ``{"messages": prompt + [best answer]}`` and counts: the best usable sample of each prompt, kept when
    the judge scores it as users would approve it (``boundary_bar`` of the ``thumbs``, KTO rows; without both kinds
    of thumb, the median of ``targets``, the users' own SFT rows); when ``targets`` and those picks are fewer than
    ``min_rows``, the next best picks fill in.

    The bar keeps the judge's guesses from diluting what users said: on a 64-vote round with 30% edits
    (bench/rl_replay.py, concise) SFT on the 18 edits and approved answers took held-out approval 4% -> 79%, and
    adding all the judge's 19 favourites gave 33%; users would approve 7 of them, the 7 it scored highest. The bar
    must not be what users' targets score, though: in a thumbs-only round 2 the approved answers (short answers to
    questions with short answers) set a bar no pick cleared, and SFT on them alone left approval at 4%; the boundary
    kept 7 picks and gave 12%. Too few rows loop: 5 approved answers alone did (bench/loop.py), hence the fill."""
    picks, counts = judged_picks(model, tokenizer, judge, prompts, k=k, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed, deadline=deadline, stop=stop)
    rows, selected = pick_rows(picks, pick_bar(judge, targets, thumbs), targets=len(targets), min_rows=min_rows)
    return rows, {**counts, **selected}


def pick_bar(judge, targets: Sequence[dict], thumbs: Sequence[dict]) -> float | None:
    """The score a best-of-k pick must reach: ``boundary_bar`` of the thumbs, else ``targets_bar``."""
    bar = boundary_bar(judge, thumbs)
    return targets_bar(judge, targets) if bar is None else bar


def last_user_turn(prompt: Conversation) -> str:
    """The last user turn: what an on-topic answer must mention."""
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
