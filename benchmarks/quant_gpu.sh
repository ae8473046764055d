#!/usr/bin/env bash
# Issue 13's GPU measurements in one device call, fitted to SECONDS of wall time:
#   bash benchmarks/quant_gpu.sh OUT_DIR SECONDS
# 1. at once (mostly Triton compiling on the CPU, little GPU memory): the GPU kernel tests
#    (tests/kernels/test_quant_linear.py -m gpu, 6 processes), the GEMM sweep's candidates checked against the
#    reference (8 processes, which compiles them) and the quantized engine's bf16-vs-fp32 accuracy tests;
# 2. end to end at 1 / 32 sequences, Falcon-H1-7B then FalconMamba-7B, each bf16, GPTQ-Int4, FP8, GPTQ-Int8
#    (benchmarks/quant.py), for 2/5 of SECONDS (then no new variant starts);
# 3. the GEMM sweep with what is left: bf16, the default config and each candidate side by side
#    (Falcon-H1-7B and FalconMamba-7B shapes; 1 row first, then 32, then 16).
# Logs only under OUT_DIR (the device tool returns at most 8 files). Needs pytest-xdist, and the engine's
# wheels (fastapi, pydantic, llguidance...) installed beforehand (benchmarks/RESULTS.md).
set -uo pipefail
out=${1:?output directory}; total=${2:?seconds}
end=$(( $(date +%s) + total ))
left() { echo $(( end - $(date +%s) )); }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"
rows="1 32 16"

t=$(( total * 3 / 10 )); (( t > 80 )) && t=80
timeout $t python3 -m pytest -m gpu -p no:cacheprovider -n 6 -v tests/kernels/test_quant_linear.py \
  > "$out/kernel_tests.log" 2>&1 &
kernel_tests=$!
timeout $t python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_quant.py -k agrees_with_float32 -s 2>&1 \
  | grep -v '^\[transformers\]' > "$out/accuracy.log" &
accuracy=$!
timeout $t python3 -m benchmarks.quant --out /tmp/quant_check --order check --check-procs 8 --sweep-rows $rows \
  > "$out/check.log" 2>&1
wait $kernel_tests $accuracy
echo "kernel tests: $(grep -c PASSED "$out/kernel_tests.log") passed, $(grep -c FAILED "$out/kernel_tests.log") failed"
grep -E "bf16 vs fp32|passed|failed" "$out/accuracy.log"; tail -1 "$out/check.log"

b=$(( total * 2 / 5 ))
timeout $(( b + 35 )) python3 -m benchmarks.quant --out /tmp/quant_e2e --order e2e \
  --models falcon-h1-7b falcon-mamba-7b --seqs 1 32 --max-num-seqs 32 --budget-s $b > "$out/e2e.log" 2>&1
grep "^| falcon" "$out/e2e.log"

checked=(); [[ -f /tmp/quant_check/checked.json ]] && checked=(--checked /tmp/quant_check/checked.json)
b=$(( $(left) - 15 ))
(( b > 5 )) && timeout $(( b + 10 )) python3 -m benchmarks.quant --out /tmp/quant_sweep --order sweep \
  --check-procs 8 --sweep-rows $rows "${checked[@]}" --budget-s $b > "$out/sweep.log" 2>&1
grep "^| [0-9]" "$out/sweep.log"
echo "done with $(left) s left"
