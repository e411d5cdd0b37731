"""Prometheus metrics of one service process, in a registry of its own (two apps in one process never clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from service.engine.base import Engine

disable_created_metrics()  # the *_created series only double the output
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("flywheel_requests", "Generation requests by model and outcome.",
                                ["model", "outcome"], registry=r)
        self.prompt_tokens = Counter("flywheel_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("flywheel_completion_tokens", "Tokens generated.", ["model"], registry=r)
        self.ttft = Histogram("flywheel_time_to_first_token_seconds", "Time to the first generated text.",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("flywheel_request_latency_seconds", "Time from request to last token.",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("flywheel_queue_depth", "Requests waiting for a batch slot.", registry=r)
        self.running = Gauge("flywheel_running_requests", "Requests being decoded.", registry=r)
        self.loaded_adapters = Gauge("flywheel_loaded_adapters", "Adapters loaded in the engine.", registry=r)
        self.engine_ok = Gauge("flywheel_engine_healthy", "1 while the engine serves.", registry=r)
        self.adapter_load = Histogram("flywheel_adapter_load_seconds", "Time to verify and load an adapter.",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16), registry=r)
        self.adapter_load_failures = Counter("flywheel_adapter_load_failures", "Adapters refused at load.",
                                             registry=r)
        self.serving = Gauge("flywheel_serving_version", "Adapter version behind each alias (0: the base model).",
                             ["alias"], registry=r)

    def render(self, engine: Engine, aliases: dict) -> bytes:
        for alias, row in aliases.items():
            self.serving.labels(alias).set(row["version"] if row else 0)
        health = engine.health()
        self.queue_depth.set(health.queue_depth)
        self.running.set(health.running)
        self.loaded_adapters.set(len(health.loaded_adapters))
        self.engine_ok.set(1 if health.ok else 0)
        return generate_latest(self.registry)
