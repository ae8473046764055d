#!/usr/bin/env bash
# Everything that needs the GPU, in one go (the device tool's machines start bare):
#   bash benchmarks/gpu_suite.sh OUT_DIR [offline.py args...]
# Needs the wheels of pytest/fastapi/uvicorn/pydantic in .whl/ (see benchmarks/RESULTS.md).
set -uo pipefail
out=${1:?output directory}; shift
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"

# 1. correctness on the GPU: kernels at real shapes, engine vs transformers, graphs vs eager, bf16 vs fp32
python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS:-tests/test_gpu.py tests/test_gpu_prefix_cache.py tests/kernels} -s 2>&1 | tee "$out/gpu_tests.log" | tail -15

# 2. the server on the GPU, driven by the load generator
python3 -m server --device cuda --port 8011 > "$out/server.log" 2>&1 &
server=$!
for _ in $(seq 120); do curl -sf localhost:8011/health > /dev/null && break; sleep 1; done
python3 benchmarks/serve.py --base-url http://127.0.0.1:8011 --num-prompts 64 --max-concurrency 16 \
  --random-input-len 64 --random-output-len 32 2>&1 | tee "$out/serve_bench.txt" | tail -25
kill $server; wait $server 2>/dev/null

# 3. throughput against the roofline
python3 -m benchmarks.offline --out "$out/offline.md" "$@" 2>&1 | tail -30

# 4. the prefix cache on vs off: chat TTFT per turn, shared-prefix hit rate and TTFT, decode speed
python3 -m benchmarks.prefix_cache --out "$out/prefix_cache.md" 2>&1 | tail -30

# 5. the cost of constrained decoding (needs llguidance's wheel in .whl/ too)
python3 -m benchmarks.structured --model falcon-h1-7b --out "$out/structured.md" 2>&1 | tail -10

# 6. LoRA adapters: decode with none, one and 8 mixed rank-16 adapters
python3 -m benchmarks.lora --out "$out/lora.md" 2>&1 | tail -12
