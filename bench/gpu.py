"""The GPU path, checked in one short run: the local engine on CUDA in bf16, and LoRA training in bf16 vs fp32.

* engine: ``LocalEngine(device="cuda")`` (dtype auto = bfloat16) serving 1 stream, then 16 concurrent streams on
  the base model, on one LoRA adapter and over four (mixed adapters in one batch), every request generating exactly
  --max-tokens tokens; tokens/s per scenario and the ratios 16 vs 1 and 4 adapters vs 1;
* training: ``worker.train.train_adapter`` for SFT, DPO and KTO, --steps steps each on small synthetic datasets, in
  bfloat16 (mixed precision) and in float32 on the same GPU; seconds per step, the loss moved, and the saved
  adapter loads into the CUDA engine and answers;
* worker: the run's reward model (``worker.reward``) trained and loaded on the GPU, best-of-k sampling and its bar
  (the judge's scores of the thumbs), the rl stage (GRPO against that reward model, bf16) and the gate's behaviour
  check (``worker.evaluate``, greedy answers of candidate and base to held-out and gate prompts, judged) on CUDA:
  seconds and the devices used. With random weights the numbers check the code path, not what is learned.

The model is --model, a local folder. Where its weights cannot be brought (a machine with no hub, a size limit on
what travels), --random-init builds the same architecture from the folder's config and tokenizer with random
weights: shapes, kernels and code paths are those of the real model, only the text is meaningless.
Prints tables and writes JSON to bench/results/gpu-<UTC timestamp>.json (or --out).
Run: ``python bench/gpu.py --model ~/.cache/flywheel/models/SmolLM2-135M-Instruct`` on a CUDA machine.
"""

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serve import format_table  # noqa: E402 - bench/serve.py

from service.engine.base import GenerationRequest, SamplingParams  # noqa: E402
from service.engine.local import LocalEngine  # noqa: E402
from worker.data import Split, TrainingData  # noqa: E402
from worker.train import TrainConfig, train_adapter  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUESTIONS = ["How do I boil an egg?", "Why is the sky blue?", "Name three rivers.", "What is a prime number?",
             "How do plants grow?", "Give me a tip for sleeping well.", "What is rain?", "How do I learn to cook?"]


def random_model(config_dir: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    model.save_pretrained(out)
    for file in config_dir.iterdir():
        if file.suffix != ".safetensors" and not (out / file.name).exists():
            shutil.copy(file, out / file.name)
    return out


def random_adapters(model_dir: Path, out: Path, n: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for seed in range(n):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(seed)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            task_type="CAUSAL_LM", init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(out / f"a{seed}")
        paths.append(out / f"a{seed}")
    return paths


async def generate(engine: LocalEngine, adapters: list[str], per_client: int, max_tokens: int) -> dict:
    async def client(i: int, adapter: str) -> int:
        tokens = 0
        for j in range(per_client):
            request = GenerationRequest(uuid.uuid4().hex, [{"role": "user", "content": QUESTIONS[(i + j) % 8]}],
                                        SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                                        adapter)
            async for chunk in engine.generate(request):
                if chunk.finish_reason:
                    tokens += chunk.completion_tokens
        return tokens

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(client(i, a) for i, a in enumerate(adapters))))
    wall = time.perf_counter() - started
    return {"requests": len(adapters) * per_client, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


async def engine_bench(model_dir: Path, adapters: list[Path], clients: int, max_tokens: int) -> dict:
    engine = LocalEngine(str(model_dir), device="cuda")
    await engine.start()
    try:
        param = next(engine.model.parameters())
        for i, path in enumerate(adapters):
            await engine.load_adapter(f"a{i}", str(path))
        await generate(engine, ["base"] * 2, 1, 8)  # warm-up: CUDA kernels, allocator
        await generate(engine, [f"a{i}" for i in range(len(adapters))], 1, 8)
        scenarios = {
            "1 stream, base": await generate(engine, ["base"], 4, max_tokens),
            f"{clients} streams, base": await generate(engine, ["base"] * clients, 2, max_tokens),
            f"{clients} streams, 1 adapter": await generate(engine, ["a0"] * clients, 2, max_tokens),
            f"{clients} streams, 4 adapters": await generate(
                engine, [f"a{i % len(adapters)}" for i in range(clients)], 2, max_tokens),
        }
        rate = {k: v["tokens_per_s"] for k, v in scenarios.items()}
        return {"device": str(param.device), "dtype": str(param.dtype), "gpu": torch.cuda.get_device_name(),
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "scenarios": scenarios,
                "ratio_concurrent_over_single": rate[f"{clients} streams, base"] / rate["1 stream, base"],
                "ratio_4_adapters_over_1":
                    rate[f"{clients} streams, 4 adapters"] / rate[f"{clients} streams, 1 adapter"]}
    finally:
        await engine.stop()


def synthetic_data(n: int) -> TrainingData:
    def user(q):
        return [{"role": "user", "content": q}]

    def said(a):
        return [{"role": "assistant", "content": a}]

    good = "Here are clear steps: 1. Start simple. 2. Practise daily. 3. Check your progress."
    bad = "I don't know."
    questions = [f"{QUESTIONS[i % 8]} (case {i})" for i in range(n)]
    return TrainingData(
        sft=Split(train=[{"messages": user(q) + said(good)} for q in questions]),
        dpo=Split(train=[{"prompt": user(q), "chosen": said(good), "rejected": said(bad)} for q in questions]),
        kto=Split(train=[{"prompt": user(q), "completion": said(good if i % 2 else bad), "label": bool(i % 2)}
                         for i, q in enumerate(questions)]))


def training_bench(model_dir: Path, steps: int, scratch: Path) -> list[dict]:
    rows = []
    data = synthetic_data(64)
    for algorithm in ("sft", "dpo", "kto"):
        for dtype in ("bfloat16", "float32"):
            config = TrainConfig(algorithm=algorithm, max_steps=steps, dtype=dtype, batch_size=8)
            out = scratch / f"{algorithm}-{dtype}"
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            result = train_adapter(config, data, str(model_dir), out)
            seconds = time.perf_counter() - started
            stage = result.stages[-1]
            rows.append({"algorithm": algorithm, "dtype": dtype, "steps": stage["steps"],
                         "s_per_step": seconds / stage["steps"], "seconds_total": seconds,
                         "loss_first": stage["first"].get("loss"), "loss_last": stage["last"].get("loss"),
                         "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "adapter": str(out)})
    return rows


async def trained_adapter_answers(model_dir: Path, adapter: Path) -> str:
    engine = LocalEngine(str(model_dir), device="cuda")
    await engine.start()
    try:
        await engine.load_adapter("trained", str(adapter))
        request = GenerationRequest("check", [{"role": "user", "content": "How do I learn to cook?"}],
                                    SamplingParams(max_tokens=24, temperature=0), "trained")
        return "".join([chunk.text async for chunk in engine.generate(request)])
    finally:
        await engine.stop()


def worker_bench(model_dir: Path, adapter: Path, steps: int, scratch: Path) -> dict:
    from worker.evaluate import GateConfig, evaluate
    from worker.reward import RewardModel, RewardTrainConfig, train_reward_model
    from worker.sampling import best_of_k, device, load_sampler

    data = synthetic_data(48)
    for split in (data.dpo, data.kto, data.sft):
        split.heldout, split.train = split.train[:16], split.train[16:]
    started = time.perf_counter()
    result = train_reward_model(RewardTrainConfig(max_steps=steps), data, str(model_dir), scratch / "reward")
    reward_s = time.perf_counter() - started
    judge = RewardModel(result.path, str(model_dir))
    model, tokenizer = load_sampler(str(model_dir))
    prompts = [r["prompt"] for r in data.dpo.train[:16]]
    started = time.perf_counter()
    rows, counts = best_of_k(model, tokenizer, judge, prompts, k=4, max_new_tokens=64, targets=data.sft.train,
                             thumbs=data.kto.train)
    best_of_k_s = time.perf_counter() - started
    started = time.perf_counter()
    progress = []
    rl = train_adapter(TrainConfig(algorithm="rl", max_steps=steps, dtype="bfloat16", rl_max_new_tokens=64), data,
                       str(model_dir), scratch / "rl", on_progress=progress.append, judge=judge)
    rl_s = time.perf_counter() - started
    rewards = [p["reward"] for p in progress if "reward" in p]
    started = time.perf_counter()
    verdict = evaluate(str(model_dir), str(adapter), None, data, GateConfig(max_new_tokens=64), judge)
    return {"rl_s": rl_s, "rl_steps": rl.stages[0]["steps"], "rl_reward_first_last": rewards[:1] + rewards[-1:],
            "device": device(), "judge_device": str(judge._scorer.model.device), "reward_s": reward_s,
            "reward_steps": result.metrics["steps"], "reward_heldout_accuracy": result.metrics["heldout_accuracy"],
            "best_of_k_s": best_of_k_s, "best_of_k": counts, "gate_s": time.perf_counter() - started,
            "gate_metrics": {k: verdict.metrics.get(k) for k in ("behaviour_prompts", "changed_share",
                                                                 "heldout_behaviour_prompts", "judge_win_rate",
                                                                 "candidate_accuracy")},
            "gate_reasons": verdict.reasons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a local transformers folder")
    parser.add_argument("--random-init", action="store_true", help="random weights from the folder's config")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="training steps per algorithm and dtype")
    parser.add_argument("--parts", nargs="+", choices=["engine", "training", "worker"],
                        default=["engine", "training", "worker"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark checks the GPU path")
    created = datetime.now(UTC)
    scratch = Path(tempfile.mkdtemp(prefix="flywheel-gpu-"))
    model_dir = random_model(args.model, scratch / "model") if args.random_init else args.model
    adapters = random_adapters(model_dir, scratch / "adapters", 4)

    serving, training, answer, worker = None, [], "", None
    if "engine" in args.parts:
        serving = asyncio.run(engine_bench(model_dir, adapters, args.clients, args.max_tokens))
        print(f"engine on {serving['gpu']}: {serving['device']} {serving['dtype']}, "
              f"peak {serving['peak_memory_gib']:.2f} GiB")
        print(format_table(["scenario", "requests", "tokens", "wall s", "tokens/s"],
                           [[k, *v.values()] for k, v in serving["scenarios"].items()]))
        print(f"ratio {args.clients} streams / 1: {serving['ratio_concurrent_over_single']:.2f}   "
              f"4 adapters / 1: {serving['ratio_4_adapters_over_1']:.2f}\n")
    if "training" in args.parts:
        training = training_bench(model_dir, args.steps, scratch)
        print(format_table(["algorithm", "dtype", "steps", "s/step", "loss first", "loss last", "peak GiB"],
                           [[r["algorithm"], r["dtype"], r["steps"], r["s_per_step"], r["loss_first"],
                             r["loss_last"], r["peak_memory_gib"]] for r in training]))
        answer = asyncio.run(trained_adapter_answers(model_dir, Path(training[0]["adapter"])))
        print(f"\nthe bf16-trained SFT adapter loads into the CUDA engine and answers {len(answer)} characters")
    if "worker" in args.parts:
        worker = worker_bench(model_dir, adapters[0], args.steps, scratch)
        print(format_table(["worker step", "seconds"], [["reward model", worker["reward_s"]],
                                                       ["best-of-k", worker["best_of_k_s"]],
                                                       [f"rl, {worker['rl_steps']} steps", worker["rl_s"]],
                                                       ["gate", worker["gate_s"]]]))
        print(f"devices: generation {worker['device']}, judge {worker['judge_device']}; best-of-k "
              f"{worker['best_of_k']}; gate {worker['gate_metrics']}")

    out = args.out or RESULTS_DIR / f"gpu-{created:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"created_utc": created.isoformat(), "random_init": args.random_init,
                               "torch": torch.__version__, "serving": serving, "training": training,
                               "trained_adapter_answer_chars": len(answer), "worker": worker}, indent=2,
                              default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
