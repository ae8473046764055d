"""Prometheus metrics, named like vLLM's with the prefix `falcon_serve:` and a `model_name` label.

Engine-side numbers (running/waiting requests, cache usage, preemptions, prefix-cache hits) are read from
`engine.stats()` at scrape time; request-side numbers (tokens, latencies, outcomes) are recorded
by the handlers through `RequestMetrics`. Each app owns its own registry, so tests can run several.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from engine.llm_engine import EngineStats
    from engine.outputs import StepOutput

PREFIX = "falcon_serve:"
FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so the same dashboards work.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector(Collector):
    """Gauges (and the cumulative preemption count) read from the engine when Prometheus scrapes."""

    def __init__(self, model_name: str, read_stats: Callable[[], EngineStats | None]) -> None:
        self.model_name, self.read_stats = model_name, read_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.read_stats()  # None while the model loads: report zeros so series never gap

        def value(name: str) -> float:
            return float(getattr(stats, name)) if stats is not None else 0.0

        gauges = (
            ("num_requests_running", "Number of requests currently running (scheduled) in the engine.",
             "num_running"),
            ("num_requests_waiting", "Number of requests waiting to be scheduled.", "num_waiting"),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", "kv_cache_usage"),
            ("state_slots_usage_perc", "Fraction of SSM/conv state slots in use (0 to 1).", "state_slot_usage"),
            ("prefix_cache_checkpoint_usage_perc", "Fraction of the prefix cache's state-checkpoint pool in use "
             "(0 to 1).", "prefix_cache_checkpoint_usage"),
        )
        for name, doc, field in gauges:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value(field))
            yield family
        counters = (
            ("num_preemptions", "Cumulative number of preempted requests.", "num_preemptions"),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
            ("prefix_cache_hits", "Prompt tokens served from the prefix cache.", "prefix_cache_hits"),
            ("prefix_cache_checkpoint_evictions", "State checkpoints evicted from the prefix cache.",
             "prefix_cache_evicted_checkpoints"),
            ("prefix_cache_block_evictions", "Cached KV blocks evicted from the prefix cache.",
             "prefix_cache_evicted_blocks"),
        )
        for name, doc, field in counters:
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value(field))
            yield family


class ServerMetrics:
    def __init__(self, model_name: str, read_stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(model_name, read_stats))
        label = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, label, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, label, buckets=buckets, registry=self.registry).labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Number of generation tokens processed.")
        success = Counter(PREFIX + "request_success", "Count of finished requests by finish reason.",
                          ["model_name", "finished_reason"], registry=self.registry)
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.time_to_first_token = histogram("time_to_first_token_seconds",
                                             "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds",
                                             "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds",
                                             "Histogram of end-to-end request latency in seconds.",
                                             REQUEST_LATENCY_BUCKETS)
        self.request_queue_time = histogram("request_queue_time_seconds",
                                            "Histogram of time spent waiting before the first token was "
                                            "scheduled, in seconds.", REQUEST_LATENCY_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Timing and outcome of one engine request (all n samples of one prompt)."""

    def __init__(self, metrics: ServerMetrics, arrival: float, num_prompt_tokens: int, num_samples: int) -> None:
        self.metrics, self.arrival = metrics, arrival
        self.num_prompt_tokens = num_prompt_tokens
        self.num_samples = num_samples
        self.finished: set[int] = set()  # sample indices
        self.closed = False
        self.last_token_time: dict[int, float] = {}  # per sample index

    def on_output(self, out: StepOutput) -> None:
        now = time.monotonic()
        if out.queue_time is not None:
            self.metrics.request_queue_time.observe(out.queue_time)
        if out.new_token_ids:
            if not self.last_token_time:
                self.metrics.time_to_first_token.observe(now - self.arrival)
                self.metrics.prompt_tokens.inc(self.num_prompt_tokens)
            last = self.last_token_time.get(out.index)
            if last is not None:
                self.metrics.inter_token_latency.observe(now - last)
            self.last_token_time[out.index] = now
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
        elif out.prompt_logprobs is not None:  # a request that scores its prompt and generates nothing
            self.metrics.prompt_tokens.inc(self.num_prompt_tokens)
        if out.finished and out.index not in self.finished:
            self.finished.add(out.index)
            self.metrics.request_success[out.finish_reason or "stop"].inc()

    def close(self) -> None:
        """The request ended (finished, failed or abandoned by its client); idempotent."""
        if self.closed:
            return
        self.closed = True
        self.metrics.request_success["abort"].inc(self.num_samples - len(self.finished))
        self.metrics.e2e_request_latency.observe(time.monotonic() - self.arrival)
