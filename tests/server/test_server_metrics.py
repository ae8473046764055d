"""/metrics: vLLM-style names with the falcon_serve: prefix, a model_name label, and values that add up."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS

GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "state_slots_usage_perc"]
COUNTERS = ["num_preemptions", "prompt_tokens", "generation_tokens", "request_success"]
HISTOGRAMS = {"time_to_first_token_seconds": TTFT_BUCKETS, "inter_token_latency_seconds": ITL_BUCKETS,
              "e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
              "request_queue_time_seconds": REQUEST_LATENCY_BUCKETS}


def families(server) -> dict:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def test_metric_names_types_and_labels(server) -> None:
    found = families(server)
    for name in GAUGES:
        assert found["falcon_serve:" + name].type == "gauge"
    for name in COUNTERS:
        family = found["falcon_serve:" + name]
        assert family.type == "counter"
        assert any(s.name == f"falcon_serve:{name}_total" for s in family.samples)
    reasons = {s.labels["finished_reason"] for s in found["falcon_serve:request_success"].samples
               if s.name.endswith("_total")}
    assert reasons == {"stop", "length", "abort", "error"}
    for name, buckets in HISTOGRAMS.items():
        family = found["falcon_serve:" + name]
        assert family.type == "histogram"
        bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
        assert bounds == [*buckets, float("inf")]
    for family in found.values():
        if family.name.startswith("falcon_serve:"):
            assert all(s.labels["model_name"] == "tiny-falcon" for s in family.samples)


def test_request_metrics_add_up(server) -> None:
    server.wait_idle()

    def snapshot() -> dict[str, float]:
        names = ["prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count"]
        values = {n: server.metric("falcon_serve:" + n) for n in names}
        values["length"] = server.metric("falcon_serve:request_success_total", finished_reason="length")
        return values

    before = snapshot()
    body = {"prompt": "count me", "max_tokens": 7, "n": 2, "temperature": 1.0, "ignore_eos": True}
    usage = httpx.post(server.url + "/v1/completions", json=body).json()["usage"]
    after = snapshot()
    delta = {k: after[k] - before[k] for k in after}
    assert delta["prompt_tokens_total"] == usage["prompt_tokens"]
    assert delta["generation_tokens_total"] == usage["completion_tokens"] == 14
    assert delta["length"] == 2  # one per sample, as vLLM counts its child requests
    assert delta["time_to_first_token_seconds_count"] == 1
    assert delta["inter_token_latency_seconds_count"] == 2 * 6
    assert delta["e2e_request_latency_seconds_count"] == 1
    assert delta["request_queue_time_seconds_count"] == 1
