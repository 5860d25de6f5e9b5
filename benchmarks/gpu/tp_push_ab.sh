#!/usr/bin/env bash
# The pushed all-reduce path (and the rest of this tree) against the staged path and against an older tree, on
# one multi-GPU machine in one call.
#
#   bash benchmarks/gpu/tp_push_ab.sh OUT_DIR [BASELINE_TREE]
#
# Separate processes, because PyTorch sets symmetric memory up once per process (see peer_all_reduce.py):
#   1. this tree: TP=2 fp32 greedy equal to TP=1 (graphs); then, in a fresh process, bf16 prompts run alone
#      (batch-1 steps) at TP=1 and 2 and W3 at batch 1 and 32, TP=1 and TP=2 (pushed path on: the default);
#   2. this tree with INFERNEO_PEER_PUSH=0: the same bf16 prompts and W3 at TP=2 (staged path);
#   3. BASELINE_TREE (a checkout of an older commit), with this tree's benchmark scripts: W3 at TP=1 and TP=2;
#   4. the decode-attention sweep at one rank's heads at TP=2 (16), at TP=1 (32), and for grouped-query heads.
# The pushed and staged paths add the same rounded partial rows in the same order, so their tokens must be equal.
# PARTS (default "push staged base sweep") picks parts, so that the run can be split over two calls of 10 minutes.
set -uo pipefail
PARTS="${PARTS:-push staged base sweep}"
has() { [[ " $PARTS " == *" $1 "* ]]; }
cd "$(dirname "$0")/../.."
OUT="${1:?usage: tp_push_ab.sh OUT_DIR [BASELINE_TREE]}"
BASE="${2:-}"
mkdir -p "$OUT"
S=benchmarks/gpu/tp_suite.py
COMMON=(--w3-batches 1,32 --skip repeat,w1)
if has push; then
    python3 "$S" --sizes 1,2 --equality graphs --skip engine --out "$OUT/equality" > "$OUT/equality.log" 2>&1 \
        || echo "equality run failed (rc $?)"
    python3 "$S" --sizes 1,2 --equality "" "${COMMON[@]}" --out "$OUT/push" > "$OUT/push.log" 2>&1 \
        || echo "push run failed (rc $?)"
fi
if has staged; then
    INFERNEO_PEER_PUSH=0 python3 "$S" --sizes 2 --equality "" "${COMMON[@]}" --out "$OUT/staged" \
        > "$OUT/staged.log" 2>&1 || echo "staged run failed (rc $?)"
fi
if has base && [ -n "$BASE" ]; then
    cp benchmarks/gpu/*.py "$BASE/benchmarks/gpu/"
    (cd "$BASE" && PYTHONPATH="${PYTHONPATH:-}:$PWD" python3 "$S" --sizes 1,2 --equality "" --skip repeat,w1,single \
        --w3-batches 1,32 --out "$OUT/base" > "$OUT/base.log" 2>&1) || echo "baseline run failed (rc $?)"
fi
for heads in 16:16 32:32 32:8; do
    has sweep || break
    SWEEP_NO_GEMV=1 SWEEP_HEADS=${heads%:*} SWEEP_KV_HEADS=${heads#*:} OUT="$OUT" \
        python3 benchmarks/gpu/decode_sweep.py > "$OUT/attention_${heads/:/_}.log" 2>&1 || echo "sweep $heads failed"
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / name / "tp_suite.json"
    return json.loads(path.read_text())["sections"] if path.exists() else {}
push, staged = load("push"), load("staged")
a, b = push.get("single_tp2", {}).get("tokens"), staged.get("single_tp2", {}).get("tokens")
print("pushed vs staged tokens (bf16, TP=2, prompts alone):", "EQUAL" if a and a == b else f"DIFFERENT or missing")
PY
grep -h "W3 TP=\|EQUAL\|DIFFERENT\|/ TP=1\|single:\|Error\|error\|all-reduces through\|unavailable" "$OUT"/equality.log "$OUT"/push.log "$OUT"/staged.log "$OUT"/base.log \
    2>/dev/null | head -60
for f in "$OUT"/attention_*.log; do [ -f "$f" ] || continue; head -2 "$f"; sort -t: -k2 -n "$f" | grep "us/layer" | head -3; done
