"""Online serving benchmark for any OpenAI-compatible server (falcon-serve, vLLM, SGLang, ...).

Modelled on ``vllm bench serve`` (same flag names). Sends streaming requests, measures TTFT, TPOT,
ITL and end-to-end latency per request, and prints throughput and latency statistics.

Example::

    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --endpoint /v1/completions \\
        --num-prompts 200 --request-rate 8 --max-concurrency 32 \\
        --random-input-len 512 --random-output-len 128 --save-result

Token counts come from the server's final ``usage`` chunk (``stream_options.include_usage``), so no
tokenizer is needed; random prompts are built from a small word vocabulary (~1 token per word).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import httpx

VOCAB = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no out what up "
    "said about into than them can only other time new some could these two may first then do any "
    "like my now over such our man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under never"
).split()


@dataclass
class RequestSpec:
    prompt: str
    prompt_len: int  # estimate; the server's usage.prompt_tokens is reported when available
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    start_time: float = 0.0  # seconds since benchmark start
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_text: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="default: first id from GET {base-url}/v1/models")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--max-concurrency", type=int, default=None, help="default: unlimited")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s with Poisson arrivals; inf (default) sends all at once")
    p.add_argument("--dataset-name", choices=["random", "sharegpt"], default=None,
                   help="default: sharegpt if --dataset-path is given, else random")
    p.add_argument("--dataset-path", "--dataset", dest="dataset_path", default=None,
                   help="ShareGPT-style JSON file")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are sampled uniformly from [len*(1-r), len*(1+r)]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=None,
                   help="send ignore_eos=true (default: on for random prompts, off for datasets)")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated, e.g. 50,90,99")
    p.add_argument("--save-result", action="store_true", help="write a JSON result file")
    p.add_argument("--result-filename", default=None, help="implies --save-result")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    return p.parse_args(argv)


def sample_lengths(base: int, ratio: float, n: int, rng: random.Random) -> list[int]:
    lo, hi = max(1, int(base * (1 - ratio))), max(1, int(base * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_requests(n: int, input_len: int, output_len: int, ratio: float,
                    rng: random.Random) -> list[RequestSpec]:
    ins = sample_lengths(input_len, ratio, n, rng)
    outs = sample_lengths(output_len, ratio, n, rng)
    return [RequestSpec(" ".join(rng.choices(VOCAB, k=i)), i, o) for i, o in zip(ins, outs, strict=True)]


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text.split()) * 1.3))


def sharegpt_requests(path: str, n: int, rng: random.Random) -> list[RequestSpec]:
    """First human turn is the prompt; the first gpt turn's length (words*1.3) is the output length."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    pool: list[RequestSpec] = []
    for entry in data:
        turns = entry.get("conversations") or []
        human = next((t["value"] for t in turns if t.get("from") == "human" and t.get("value")), None)
        gpt = next((t["value"] for t in turns if t.get("from") == "gpt" and t.get("value")), None)
        if human and gpt:
            pool.append(RequestSpec(human, estimate_tokens(human), estimate_tokens(gpt)))
    if not pool:
        raise ValueError(f"no usable human/gpt conversations in {path}")
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def arrival_offsets(n: int, rate: float, rng: random.Random) -> list[float]:
    """Send times (s from start) of a Poisson process: exponential gaps with mean 1/rate."""
    if math.isinf(rate) or rate <= 0:
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def build_payload(endpoint: str, model: str, spec: RequestSpec, ignore_eos: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model, "max_tokens": spec.output_len, "temperature": 0.0,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if endpoint.rstrip("/").endswith("chat/completions"):
        payload["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        payload["prompt"] = spec.prompt
    if ignore_eos:
        payload["ignore_eos"] = True
    return payload


def chunk_text(chunk: dict[str, Any]) -> str:
    """Text carried by one streamed chunk (completions `text` or chat `delta.content`)."""
    parts = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        parts.append(choice.get("text") or delta.get("content") or delta.get("reasoning_content") or "")
    return "".join(parts)


async def stream_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                         res: RequestResult, t0: float) -> None:
    chunk_times: list[float] = []
    texts: list[str] = []
    async with client.stream("POST", url, json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {resp.status_code}: {body[:500]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                raise RuntimeError(f"stream error: {chunk['error']}")
            if text := chunk_text(chunk):
                chunk_times.append(time.perf_counter())
                texts.append(text)
            if usage := chunk.get("usage"):
                res.prompt_tokens = usage.get("prompt_tokens") or res.prompt_tokens
                res.completion_tokens = usage.get("completion_tokens") or 0
    res.latency = time.perf_counter() - t0
    if not chunk_times:
        raise RuntimeError("no content received")
    res.ttft = chunk_times[0] - t0
    res.itl = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]
    res.completion_tokens = res.completion_tokens or len(chunk_times)
    res.generated_text = "".join(texts)
    res.success = True


async def send_request(client: httpx.AsyncClient, url: str, payload: dict[str, Any], spec: RequestSpec,
                       bench_start: float, timeout: float) -> RequestResult:
    t0 = time.perf_counter()
    res = RequestResult(start_time=t0 - bench_start, prompt_tokens=spec.prompt_len)
    try:
        await asyncio.wait_for(stream_request(client, url, payload, res, t0), timeout)
    except Exception as e:  # any failure is recorded per request
        res.success, res.error = False, f"{type(e).__name__}: {e}".rstrip(": ")
        res.latency = time.perf_counter() - t0
    return res


async def fetch_model(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(f"{base_url}/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (same as numpy's default)."""
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(name: str, xs_s: list[float], pcts: list[float]) -> dict[str, float]:
    xs = [x * 1000 for x in xs_s]
    out = {f"mean_{name}_ms": statistics.fmean(xs) if xs else 0.0,
           f"median_{name}_ms": statistics.median(xs) if xs else 0.0,
           f"std_{name}_ms": statistics.pstdev(xs) if xs else 0.0}
    for p in pcts:
        out[f"p{p:g}_{name}_ms"] = percentile(xs, p)
    return out


def compute_metrics(results: list[RequestResult], duration: float, pcts: list[float]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.completion_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok if r.completion_tokens > 1]
    metrics: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": total_out / duration if duration else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration else 0.0,
    }
    metrics.update(summarize("ttft", [r.ttft for r in ok], pcts))
    metrics.update(summarize("tpot", tpots, pcts))
    metrics.update(summarize("itl", [x for r in ok for x in r.itl], pcts))
    metrics.update(summarize("e2el", [r.latency for r in ok], pcts))
    return metrics


def print_report(m: dict[str, Any], pcts: list[float]) -> None:
    row = "{:<40} {:<10}".format
    print("{s:{c}^51}".format(s=" Serving Benchmark Result ", c="="))
    print(row("Successful requests:", m["completed"]))
    print(row("Failed requests:", m["failed"]))
    print(row("Maximum request concurrency:", str(m["max_concurrency"])))
    print(row("Benchmark duration (s):", f"{m['duration']:.2f}"))
    print(row("Total input tokens:", m["total_input_tokens"]))
    print(row("Total generated tokens:", m["total_output_tokens"]))
    print(row("Request throughput (req/s):", f"{m['request_throughput']:.2f}"))
    print(row("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"))
    print(row("Total token throughput (tok/s):", f"{m['total_token_throughput']:.2f}"))
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for key, title in titles.items():
        print("{s:{c}^51}".format(s=f" {title} ", c="-"))
        print(row(f"Mean {key.upper()} (ms):", f"{m[f'mean_{key}_ms']:.2f}"))
        print(row(f"Median {key.upper()} (ms):", f"{m[f'median_{key}_ms']:.2f}"))
        for p in pcts:
            print(row(f"P{p:g} {key.upper()} (ms):", f"{m[f'p{p:g}_{key}_ms']:.2f}"))
    print("=" * 51)


def make_requests(args: argparse.Namespace, rng: random.Random) -> tuple[list[RequestSpec], bool]:
    """Returns the request specs and whether ignore_eos should be sent."""
    name = args.dataset_name or ("sharegpt" if args.dataset_path else "random")
    if name == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("--dataset-name sharegpt needs --dataset-path")
        specs = sharegpt_requests(args.dataset_path, args.num_prompts, rng)
    else:
        specs = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                args.random_range_ratio, rng)
    ignore_eos = args.ignore_eos if args.ignore_eos is not None else name == "random"
    return specs, ignore_eos


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the benchmark and returns the result dict (metrics, config, per-request details)."""
    rng = random.Random(args.seed)
    specs, ignore_eos = make_requests(args, rng)
    offsets = arrival_offsets(len(specs), args.request_rate, rng)
    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, pool=None)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout, trust_env=False) as client:
        model = args.model or await fetch_model(client, base)
        sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
        start = time.perf_counter()

        async def one(spec: RequestSpec, offset: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            payload = build_payload(args.endpoint, model, spec, ignore_eos)
            if sem is None:
                return await send_request(client, base + args.endpoint, payload, spec, start, args.timeout)
            async with sem:
                return await send_request(client, base + args.endpoint, payload, spec, start, args.timeout)

        results = await asyncio.gather(*(one(s, o) for s, o in zip(specs, offsets, strict=True)))
        duration = time.perf_counter() - start
    pcts = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    metrics = compute_metrics(list(results), duration, pcts)
    metrics.update(model_id=model, endpoint=args.endpoint, base_url=base, num_prompts=len(specs),
                   request_rate=args.request_rate if math.isfinite(args.request_rate) else "inf",
                   max_concurrency=args.max_concurrency, ignore_eos=ignore_eos,
                   date=datetime.now().strftime("%Y%m%d-%H%M%S"),
                   requests=[asdict(r) for r in results])
    return metrics


def save_result(result: dict[str, Any], args: argparse.Namespace) -> str:
    name = args.result_filename or "serve-{}qps-concurrency{}-{}-{}.json".format(
        result["request_rate"], result["max_concurrency"] or "inf",
        str(result["model_id"]).replace("/", "_"), result["date"])
    with open(name, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    return name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run_benchmark(args))
    print_report(result, [float(p) for p in args.metric_percentiles.split(",") if p.strip()])
    errors = sorted({r["error"] for r in result["requests"] if r["error"]})
    for err in errors[:5]:
        print(f"error: {err}", file=sys.stderr)
    if args.save_result or args.result_filename:
        print(f"Saved result to {save_result(result, args)}")
    return 0 if result["completed"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
