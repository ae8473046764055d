#!/usr/bin/env bash
# Issue 13's GPU measurements in one device call, fitted to SECONDS of wall time:
#   bash benchmarks/quant_gpu.sh OUT_DIR SECONDS
# 1. the GPU kernel tests (tests/kernels/test_quant_linear.py -m gpu, 6 processes) while the GEMM sweep's
#    candidates are checked against the reference and compiled (8 processes): both mostly Triton compiling;
# 2. the bf16-vs-fp32 accuracy tests of the quantized engine, alone on the GPU (each takes most of its memory);
# 3. end to end, Falcon-H1-7B at 1 / 32 sequences: bf16, GPTQ-Int4, FP8, GPTQ-Int8 (benchmarks/quant.py);
# 4. the GEMM sweep (bf16, the default config and each candidate side by side) with what time is left;
# 5. FalconMamba-7B end to end if time is still left.
# Needs the wheels of pytest-xdist / fastapi / pydantic / llguidance... in .whl/ (see benchmarks/RESULTS.md).
set -uo pipefail
out=${1:?output directory}; total=${2:?seconds}
end=$(( $(date +%s) + total ))
left() { echo $(( end - $(date +%s) )); }
mkdir -p "$out"  # logs only: at most 8 files come back
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"

t=$(( $(left) / 5 )); (( t > 70 )) && t=70
timeout $t python3 -m pytest -m gpu -p no:cacheprovider -n 6 -v tests/kernels/test_quant_linear.py \
  > "$out/kernel_tests.log" 2>&1 &
tests=$!
timeout $t python3 -m benchmarks.quant --out /tmp/quant_check --order check --check-procs 8 > "$out/check.log" 2>&1
wait $tests
echo "kernel tests: $(grep -c PASSED "$out/kernel_tests.log") passed, $(grep -c FAILED "$out/kernel_tests.log") failed; $(tail -1 "$out/kernel_tests.log")"; tail -1 "$out/check.log"

t=$(( $(left) / 5 )); (( t > 50 )) && t=50
timeout $t python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_quant.py -k agrees_with_float32 -s 2>&1 \
  | grep -v '^\[transformers\]' > "$out/accuracy.log"
grep -E "bf16 vs fp32|passed|failed" "$out/accuracy.log"

b=$(( $(left) * 11 / 20 )); (( b > 150 )) && b=150
timeout $(( b + 40 )) python3 -m benchmarks.quant --out /tmp/quant_e2e_h1 --order e2e --models falcon-h1-7b --seqs 1 32 \
  --max-num-seqs 32 --budget-s $b > "$out/e2e_h1.log" 2>&1
grep "^| falcon" "$out/e2e_h1.log"

b=$(( $(left) - 15 ))
(( b > 10 )) && timeout $(( b + 10 )) python3 -m benchmarks.quant --out /tmp/quant_sweep --order sweep --check-procs 8 \
  --budget-s $b > "$out/sweep.log" 2>&1
grep "^| [0-9]" "$out/sweep.log"

b=$(( $(left) - 50 ))
(( b > 20 )) && timeout $(( b + 40 )) python3 -m benchmarks.quant --out /tmp/quant_e2e_mamba --order e2e \
  --models falcon-mamba-7b --seqs 1 32 --max-num-seqs 32 --budget-s $b > "$out/e2e_mamba.log" 2>&1 \
  && grep "^| falcon" "$out/e2e_mamba.log"
echo "done with $(left) s left"
