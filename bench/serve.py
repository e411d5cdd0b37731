"""Serving benchmark for a running Flywheel service: throughput, latency and the cost of many LoRA adapters.

Every request streams a chat completion that generates exactly --max-tokens tokens (``ignore_eos``), so scenarios
compare like with like. Scenarios, run one after another against the OpenAI-compatible API:

* ``1 client``: one client sending ``4 * --requests-per-client`` requests in turn, on the base model;
* ``N clients, base``: --clients concurrent clients, each sending --requests-per-client requests in turn;
* ``N clients, 1 adapter`` / ``N clients, 4 adapters``: the same on LoRA adapter bench-a0 only, and with client i on
  bench-a{i % 4}. The adapters are random LoRAs made here with PEFT (--make-adapters) for --base-model, which must be
  the model the service serves, and are loaded with /v1/load_lora_adapter.

For each it reports aggregate generated tokens/s (completion tokens / wall time), TTFT (time to the first content
token) p50/p99 and inter-token latency mean/p99, measured as the gaps between content chunks. It prints a table and
the ratios throughput_N / throughput_1 (target >= 5) and throughput over 4 adapters / over 1 adapter (target >= 0.75),
and writes JSON to bench/results/serve-<UTC timestamp>.json (or --out). Exits 1 if any request failed.

Run: ``flywheel up`` in another shell, then ``python bench/serve.py --api-key KEY``.
"""

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ADAPTERS = [f"bench-a{i}" for i in range(4)]
PROMPTS = [
    "What is the capital of France?", "How do I boil an egg?", "Why is the sky blue?",
    "What should I pack for a weekend hike?", "How many minutes are in a day?", "What is a good name for a pet cat?",
    "How do I make a cup of tea?", "Why do leaves change colour in autumn?",
    "What is the difference between weather and climate?", "How can I sleep better at night?",
    "What are three uses for baking soda?", "How does a bicycle stay upright?", "What is a healthy breakfast?",
    "How do I write a polite email asking for a day off?", "Why do cats purr?",
    "What is the tallest mountain in the world?",
]


@dataclass
class RequestResult:
    tokens: int = 0
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between consecutive content chunks
    error: str | None = None


@dataclass
class Scenario:
    key: str
    name: str
    results: list[RequestResult]
    wall_s: float

    def summary(self) -> dict:
        """The scenario's row: counts, throughput and latency in ms (None where there is no data)."""
        ok = [r for r in self.results if r.error is None]
        tokens = sum(r.tokens for r in ok)
        ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
        gaps = [g * 1000 for r in ok for g in r.gaps_s]
        return {"scenario": self.name, "requests": len(self.results), "completion_tokens": tokens,
                "wall_s": self.wall_s, "tokens_per_s": tokens / self.wall_s if self.wall_s > 0 else 0.0,
                "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99),
                "itl_mean_ms": sum(gaps) / len(gaps) if gaps else None, "itl_p99_ms": percentile(gaps, 99),
                "errors": len(self.results) - len(ok)}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def format_table(headers: list[str], rows: list[list]) -> str:
    """Plain-text table: first column left-aligned, the rest right-aligned; floats to 2 places, None as '-'."""
    def cell(value) -> str:
        return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
    cells = [headers] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def stream_chat(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> RequestResult:
    """One streamed chat completion, timed; a non-200 answer or a broken stream is recorded as its error."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    result, chunks, usage_tokens, done, last = RequestResult(), 0, None, False, None
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:300]
                result.error = f"HTTP {response.status_code}: {text}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise ValueError(f"error event {chunk['error']}")
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            result.ttft_s = now - start
                        else:
                            result.gaps_s.append(now - last)
                        last, chunks = now, chunks + 1
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if not done:
        result.error = "stream ended without data: [DONE]"
    elif chunks == 0:
        result.error = "no content in the stream"
    result.tokens = usage_tokens if usage_tokens is not None else chunks
    return result


async def run_scenario(client: httpx.AsyncClient, key: str, name: str, models: list[str], requests_per_client: int,
                       max_tokens: int) -> Scenario:
    """One concurrent client per entry of models; client i sends its requests in turn, prompts from offset i."""
    async def client_loop(index: int, model: str) -> list[RequestResult]:
        return [await stream_chat(client, model, PROMPTS[(index + j) % len(PROMPTS)], max_tokens)
                for j in range(requests_per_client)]

    start = time.perf_counter()
    per_client = await asyncio.gather(*(client_loop(i, model) for i, model in enumerate(models)))
    return Scenario(key, name, [r for results in per_client for r in results], time.perf_counter() - start)


def make_adapters(base_model: Path, out_dir: Path) -> list[Path]:
    """Save a random (non-zero) LoRA for base_model as out_dir/bench-a{i}, one per adapter name, unless present."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = [out_dir / name for name in ADAPTERS]
    for seed, path in enumerate(paths):
        if (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file():
            continue
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        torch.manual_seed(seed)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                            task_type="CAUSAL_LM", init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(path)
    return paths


async def load_adapters(client: httpx.AsyncClient, paths: list[Path]) -> None:
    """Load the adapters into the service by name and check that /v1/models lists them."""
    for name, path in zip(ADAPTERS, paths, strict=True):
        body = {"lora_name": name, "lora_path": str(path.resolve())}
        response = await client.post("/v1/load_lora_adapter", json=body)
        if response.status_code != 200:
            sys.exit(f"loading adapter {name} failed: HTTP {response.status_code}: {response.text[:300]}")
    missing = set(ADAPTERS) - await model_ids(client)
    if missing:
        sys.exit(f"/v1/models does not list the loaded adapters {sorted(missing)}")


async def model_ids(client: httpx.AsyncClient) -> set[str]:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        sys.exit(f"GET /v1/models failed: HTTP {response.status_code}: {response.text[:300]}")
    # A loaded adapter is listed as flywheel:vN with its own name beside it; either names it.
    return {name for model in response.json()["data"] for name in (model["id"], model.get("name")) if name}


async def benchmark(args: argparse.Namespace) -> list[Scenario]:
    """Make and load the adapters unless skipped, warm every model up, then run the scenarios in turn."""
    n, per_client = args.clients, args.requests_per_client
    plan = [("single", "1 client", ["base"], per_client * 4),
            ("concurrent", f"{n} clients, base", ["base"] * n, per_client)]
    if not args.skip_adapters:
        plan += [("one_adapter", f"{n} clients, 1 adapter", [ADAPTERS[0]] * n, per_client),
                 ("four_adapters", f"{n} clients, 4 adapters", [ADAPTERS[i % 4] for i in range(n)], per_client)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=httpx.Timeout(600, connect=10),
                                 limits=httpx.Limits(max_connections=n + 4)) as client:
        try:
            await model_ids(client)
        except httpx.HTTPError as exc:
            sys.exit(f"cannot reach the service at {args.url}: {exc}")
        if not args.skip_adapters:
            await load_adapters(client, make_adapters(args.base_model.expanduser(), args.make_adapters))
        warm_models = list(dict.fromkeys(model for _, _, models, _ in plan for model in models))
        scenarios = [await run_scenario(client, "warmup", "warmup", [model], args.warmup, args.max_tokens)
                     for model in warm_models if args.warmup > 0]
        for key, name, models, requests in plan:
            print(f"running {name} ...", file=sys.stderr)
            scenarios.append(await run_scenario(client, key, name, models, requests, args.max_tokens))
    return scenarios


def ratios(scenarios: list[Scenario], clients: int) -> list[dict]:
    """The two target ratios of tokens/s against their targets; None (n/a) where a side did not run or had errors."""
    speed = {s.key: row["tokens_per_s"] for s in scenarios if (row := s.summary())["errors"] == 0}
    specs = [(f"throughput_{clients} / throughput_1", "concurrent", "single", 5.0),
             (f"throughput_{clients}_over_4_adapters / throughput_{clients}_one_adapter", "four_adapters",
              "one_adapter", 0.75)]
    out = []
    for name, top, bottom, target in specs:
        value = speed[top] / speed[bottom] if speed.get(top) is not None and speed.get(bottom) else None
        out.append({"ratio": name, "value": value, "target": target,
                    "result": "n/a" if value is None else "PASS" if value >= target else "FAIL"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    parser.add_argument("--api-key", default=os.environ.get("FLYWHEEL_API_KEY"),
                        help="bearer key, also used to load adapters (default: $FLYWHEEL_API_KEY)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests each client sends in turn")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens every request generates")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests per model before the scenarios")
    parser.add_argument("--out", type=Path, help="JSON path (default: bench/results/serve-<UTC timestamp>.json)")
    parser.add_argument("--base-model", type=Path, default=Path("~/.cache/flywheel/models/SmolLM2-135M-Instruct"),
                        help="local transformers folder of the served base model, for making the adapters")
    parser.add_argument("--make-adapters", type=Path, default=RESULTS_DIR / "adapters", metavar="DIR",
                        help="folder for the 4 bench adapters, made if missing")
    parser.add_argument("--skip-adapters", action="store_true", help="run only the base-model scenarios")
    args = parser.parse_args()
    created = datetime.now(UTC)

    scenarios = asyncio.run(benchmark(args))
    measured = [s for s in scenarios if s.key != "warmup"]
    rows = [s.summary() for s in measured]
    ratio_rows = ratios(measured, args.clients)
    errors = Counter((s.name, r.error) for s in scenarios for r in s.results if r.error)
    short = sum(1 for s in measured for r in s.results if r.error is None and r.tokens != args.max_tokens)

    print(format_table(["scenario", "requests", "completion tokens", "wall s", "tokens/s", "TTFT p50 ms",
                        "TTFT p99 ms", "ITL mean ms", "ITL p99 ms", "errors"], [list(row.values()) for row in rows]))
    print()
    print(format_table(["ratio", "value", "target", "result"], [list(row.values()) for row in ratio_rows]))
    if short:
        print(f"\nwarning: {short} requests did not generate exactly {args.max_tokens} tokens (ignore_eos unhonoured?)")
    if errors:
        print("\nerrors:")
        for (name, error), count in errors.items():
            print(f"  [{name}] x{count}: {error}")

    out = args.out or RESULTS_DIR / f"serve-{created:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {key: getattr(args, key) for key in ("url", "clients", "requests_per_client", "max_tokens", "warmup")}
    report = {"created_utc": created.isoformat(), "settings": settings, "scenarios": rows, "ratios": ratio_rows,
              "errors": [{"scenario": name, "error": error, "count": count} for (name, error), count in errors.items()]}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
