"""benchmarks/serve.py against our own server (CPU, tiny model): every request completes, counts add up."""

from __future__ import annotations

import asyncio

from benchmarks import serve


def test_load_generator_against_the_server(server) -> None:
    args = serve.parse_args(["--base-url", server.url, "--num-prompts", "12", "--max-concurrency", "4",
                             "--random-input-len", "16", "--random-output-len", "8", "--request-rate", "50",
                             "--seed", "0"])
    result = asyncio.run(serve.run_benchmark(args))
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["total_output_tokens"] == 12 * 8  # ignore_eos: every request runs to max_tokens
    assert result["mean_ttft_ms"] > 0 and result["output_throughput"] > 0
    server.wait_idle()
