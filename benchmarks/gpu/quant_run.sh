#!/usr/bin/env bash
# One device call for issue 20 (see README.md, "Quantization"): the FP8 KV-cache kernels on CUDA (stored bytes and
# error against the reference, decode timing FP8 vs bf16), the FP8 linear paths (row-wise _scaled_mm, Triton
# block GEMM, graph replay), then the small parity model the FP8-KV test reads (tests/data/parity-llama), then quant_suite.py (Llama-2-7B bf16 / FP8 / W4A16 / FP8 KV beside gpt-fast).
# gpt-fast's files are carried in scratch/gpt-fast (see quant_suite.py).
set -u
OUT=${OUT:?set OUT}
DEADLINE=${1:-330}
export PYTHONUNBUFFERED=1
timeout 100 python3 benchmarks/gpu/train_parity_fixture.py --out "$OUT/parity-llama" > "$OUT/train_parity.log" 2>&1
echo "train_parity rc=$?"; tail -1 "$OUT/train_parity.log"
timeout 60 python3 benchmarks/gpu/check_kv_fp8.py --context 8192 --batch 1 32 > "$OUT/check_kv_fp8.log" 2>&1
echo "check_kv_fp8 rc=$?"; tail -12 "$OUT/check_kv_fp8.log"
timeout 50 python3 benchmarks/gpu/fp8_check.py --iters 30 --out "$OUT/fp8_check.jsonl" > "$OUT/fp8_check.log" 2>&1
echo "fp8_check rc=$?"; tail -12 "$OUT/fp8_check.log"
timeout $((DEADLINE + 30)) python3 benchmarks/gpu/quant_suite.py --deadline "$DEADLINE" --out "$OUT" 2>&1 | tail -c 7000
