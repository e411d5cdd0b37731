"""Worker generation benchmark: continuous batching (worker/sampling.py ``generate``) against ``model.generate``.

The worker generates twice a round: best-of-k samples (k answers to each of the newest training prompts, at the
sampling temperature) and the gate's greedy answers to its held-out prompts. Both ran on transformers'
``model.generate``, which decodes every row of a batch until the longest one ends, and a batch of 64 sampled rows
nearly always holds one that runs to the token limit. ``generate`` now drops a finished row and admits a waiting
one in its place (the engine's KV batch, service/engine/batch.py).

Two workloads, each timed for the baseline (``model.generate``, batches of --batch-size rows as the worker used to
run it) and for ``generate`` in the same process, alternating, --repeats times (median reported):
- best-of-k: --k samples to each of --prompts training prompts of bench/prompts.txt at the worker's temperature;
- greedy: one answer to each of the gate's 32 prompts and --prompts held-out prompts.

On a machine where best-of-k samples in bfloat16 (``sampling_dtype``: a GPU, a CPU with AMX) best-of-k is also run
that way, as the worker does; greedy stays float32, as the gate and production answer.

Reported per workload: seconds, the ratio (to the baseline; below 1 is faster), forward passes, answers that
finished within --max-new-tokens, mean answer tokens; for greedy also how many answers are identical (they should
be, bar ties the different padding breaks another way). --adapter samples from a LoRA (e.g. a round's adapter whose
answers are short), as the worker does from production.

Prints a table, writes JSON to bench/results/sampling-<UTC timestamp>.json (or --out).
Run: ``python bench/sampling.py`` (the default model fetched).
"""

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from prompts import load_prompts, split  # bench/prompts.py, importable when this file runs as a script

from service.engine.weights import load_pretrained, stop_token_ids
from worker.evaluate import GATE_PROMPTS, load_gate_prompts
from worker.sampling import SAMPLE_TEMPERATURE, Answer, generate, load_sampler, sampling_dtype

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def baseline_generate(model, tokenizer, prompts, *, max_new_tokens, k=1, temperature=0.0, batch_size=64, seed=0):
    """The worker's generation before continuous batching: ``model.generate`` on batches of ``batch_size`` rows
    (``batch_size // k`` prompts, k return sequences each)."""
    import torch

    stop_ids = stop_token_ids(model, tokenizer)
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[list[Answer]] = [[] for _ in texts]
    torch.manual_seed(seed)
    with torch.inference_mode():
        for start in range(0, len(order), max(1, batch_size // k)):
            batch = order[start:start + max(1, batch_size // k)]
            inputs = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(model.device)
            sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, num_return_sequences=k,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=list(stop_ids), **sampling)
            new = output[:, inputs["input_ids"].shape[1]:]
            for row, ids in enumerate(new.tolist()):
                ended = any(t in stop_ids for t in ids)
                ids = ids[:next((j for j, t in enumerate(ids) if t in stop_ids), len(ids))]
                out[batch[row // k]].append(Answer(tokenizer.decode(ids, skip_special_tokens=True).strip(), ended))
    return out


def counting_steps(model):
    """Wrap ``model.forward`` to count its calls: prefills and decode steps."""
    calls = {"n": 0}
    forward = model.forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return forward(*args, **kwargs)

    model.forward = counted
    return calls, lambda: setattr(model, "forward", forward)


def summary(answers: list[list[Answer]], tokenizer) -> dict:
    flat = [a for per_prompt in answers for a in per_prompt]
    tokens = [len(tokenizer(a.text, add_special_tokens=False)["input_ids"]) for a in flat]
    return {"answers": len(flat), "finished": sum(a.finished for a in flat),
            "mean_tokens": round(statistics.mean(tokens), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(Path.home() / ".cache/flywheel/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--adapter", help="LoRA folder to sample from (the worker samples from production)")
    parser.add_argument("--prompts", type=int, default=32, help="training prompts for best-of-k (the worker's "
                                                                "best_of_prompts), held-out prompts for greedy")
    parser.add_argument("--k", type=int, default=16, help="samples per prompt (the worker's best_of_k)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the gate's and best-of-k's token limit")
    parser.add_argument("--batch-size", type=int, default=64, help="rows decoded at once, both ways")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/sampling-<UTC timestamp>.json)")
    args = parser.parse_args()

    import torch

    torch.manual_seed(args.seed)
    model, tokenizer = load_pretrained(args.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    parts = split(load_prompts())
    train = [[{"role": "user", "content": p.text}] for p in parts["train"][:args.prompts]]
    heldout = [[{"role": "user", "content": p.text}] for p in parts["heldout"][:args.prompts]]
    gate = [[{"role": "user", "content": c["prompt"]}] for c in load_gate_prompts(GATE_PROMPTS)]
    ways = [("baseline", model, baseline_generate), ("generate", model, generate)]
    if sampling_dtype() != "float32":  # the worker's best-of-k: generate in the dtype it samples in
        ways.append((f"generate {sampling_dtype()}", load_sampler(args.model, args.adapter)[0], generate))
    workloads = {
        "best-of-k": (dict(prompts=train, k=args.k, temperature=SAMPLE_TEMPERATURE), ways),
        "greedy": (dict(prompts=gate + heldout, k=1, temperature=0.0), ways[:2]),  # the gate: float32 as served
    }
    common = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    for _, m, _ in ways:
        generate(m, tokenizer, train[:2], max_new_tokens=8)  # warm-up: first-call allocations

    results = {}
    for name, (work, its_ways) in workloads.items():
        row, texts = {}, {}
        runs = {way: [] for way, _, _ in its_ways}
        for _ in range(args.repeats):
            for way, m, run in its_ways:
                calls, restore = counting_steps(m.get_base_model() if hasattr(m, "get_base_model") else m)
                started = time.perf_counter()
                answers = run(m, tokenizer, **work, **common)
                runs[way].append(time.perf_counter() - started)
                restore()
                row[way] = {"forward_calls": calls["n"], **summary(answers, tokenizer)}
                texts[way] = [a[0].text for a in answers]
        row = {way: {"seconds": round(statistics.median(runs[way]), 1), **row[way]} for way in runs}
        for way in runs:
            row[way]["ratio"] = round(row[way]["seconds"] / row["baseline"]["seconds"], 2)
        row["seconds_each_repeat"] = {k: [round(s, 1) for s in v] for k, v in runs.items()}
        if work["k"] == 1:
            row["identical_answers"] = sum(a == b for a, b in zip(texts["generate"], texts["baseline"], strict=True))
        results[name] = (row, list(runs))

    print(f"\n{'workload':<10} {'way':<17} {'seconds':>8} {'forwards':>9} {'finished':>9} {'tokens':>7}  ratio")
    for name, (row, its_ways) in results.items():
        for way in its_ways:
            r = row[way]
            print(f"{name:<10} {way:<17} {r['seconds']:>8.1f} {r['forward_calls']:>9} "
                  f"{r['finished']:>4}/{r['answers']:<4} {r['mean_tokens']:>7}  {r['ratio']:.2f}")
        if "identical_answers" in row:
            print(f"{'':<10} identical greedy answers: {row['identical_answers']}/{row['generate']['answers']}")
    results = {name: row for name, (row, _) in results.items()}
    created = datetime.now(UTC)
    out = args.out or RESULTS_DIR / f"sampling-{created:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"created_utc": created.isoformat(), "settings": vars(args) | {
        "model": args.model, "out": str(out)}, "results": results}, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
