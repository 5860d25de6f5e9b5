#!/usr/bin/env bash
# One device call (2026-12-07): register caps and epilogue variants on the batch-1 decode path.
#   1. fp8_epilogue_chain.py: Llama-2-7B's FP8 one-row GEMVs chained over 32 layers, the RMSNorms as launches or in
#      the epilogues, with variants (producers' early loads, register caps, tilings);
#   2. moe_decode_sweep.py --experts-only with SWEEP_PAIR_CHUNKS=1: Qwen3-30B-A3B's few-token expert kernels as
#      shipped beside the down kernel's chunk-by-chunk sums (commit f35df1c's grid also had register caps);
#   3. moe_suite.py --decode-only: the shipped pair tiles A/B'd in the engine against the sweep's best;
#   4. quant_suite.py: FP8 + FP8 KV at batch 1 in ROUNDS alternating rounds, bf16 beside: as shipped, the
#      epilogues (INFERNEO_FP8_NORM_EPILOGUE=1: their own tilings, "epilogue_shapes"), and the epilogues in the
#      GEMV's tilings (a tiling file without "epilogue_shapes"). Commit f35df1c's calls A/B'd tiling files A-C here
#      (the o producer in 16-row tiles with the gate/up reader capped at 64 registers; the gate/up reader in 4-row
#      tiles of 8 or 16 warps).
# Usage (carry scratch/quant/whl): OUT=... [PARTS=chain,moe,quant] bash benchmarks/gpu/caps_run.sh
source benchmarks/gpu/device_env.sh
mkdir -p "$OUT/chain" "$OUT/moe_sweep" "$OUT/moe" "$OUT/quant"
part() { [[ ",${PARTS:-chain,moe,quant}," == *",$1,"* ]]; }
if part chain; then
timeout ${CHAIN_TIMEOUT:-170} python3 benchmarks/gpu/fp8_epilogue_chain.py --out "$OUT/chain" > "$OUT/chain/out.log" 2>&1
echo "chain rc=$?"; grep -E "best |failed|rror|diff|added" "$OUT/chain/out.log" | cut -c1-200
fi
if part moe; then
SWEEP_PAIR_CHUNKS=1 timeout ${SWEEP_TIMEOUT:-110} python3 benchmarks/gpu/moe_decode_sweep.py --experts-only \
  --out "$OUT/moe_sweep" > "$OUT/moe_sweep/out.log" 2>&1
echo "sweep rc=$?"; grep -E "gate/up|down  |best|call T=1|rror" "$OUT/moe_sweep/out.log" | cut -c1-260
AB=$(python3 - "$OUT/moe_sweep/moe_decode_sweep.json" <<'PY'
import json, sys
from inferneo.kernels.moe_tile_configs import pair_tiles
import torch
try:
    best = json.load(open(sys.argv[1]))["experts"]["best"]
except Exception:
    print(""); sys.exit()
shipped = pair_tiles(128, 768, 2048, torch.bfloat16).to_json()
diff = {k: v for k, v in best.items() if shipped.get(k) != v}
down = {k: v for k, v in diff.items() if k.startswith("down")}
settings = ["shipped:"]
if diff:
    settings.append("best:INFERNEO_MOE_PAIR_TILES=" + "+".join(f"{k}={v}" for k, v in diff.items()))
if down and down != diff:
    settings.append("best-down:INFERNEO_MOE_PAIR_TILES=" + "+".join(f"{k}={v}" for k, v in down.items()))
print(";".join(settings) if len(settings) > 1 else "")
PY
)
echo "moe A/B: ${AB:-none}"
if [ -n "$AB" ]; then
  timeout ${MOE_TIMEOUT:-260} python3 benchmarks/gpu/moe_suite.py --decode-only --deadline ${MOE_DEADLINE:-250} --ab "$AB" \
    --out "$OUT/moe" > "$OUT/moe/moe_suite.out" 2>&1
  echo "moe_suite rc=$?"; grep -E "A/B round|decode b=|rror" "$OUT/moe/moe_suite.out" | cut -c1-200
fi
fi
if part quant; then
python3 - "$OUT/quant" <<'PY'
import json, sys
from inferneo.kernels import triton_fp8_gemv as fg
table = json.loads(fg.CONFIG_FILE.read_text())
table.pop("epilogue_shapes", None)  # the epilogue launches in the GEMV's one-row tilings (before 2026-12-07 08:30)
open(sys.argv[1] + "/fp8_gemv_tiles.json", "w").write(json.dumps(table, indent=1))
PY
ARGS=()
for round in $(seq 1 ${ROUNDS:-3}); do
  ARGS+=(--ab "epi-$round@fp8+fp8kv@INFERNEO_FP8_NORM_EPILOGUE=1"
         --ab "epi-gemv-tiles-$round@fp8+fp8kv@INFERNEO_FP8_NORM_EPILOGUE=1@INFERNEO_FP8_GEMV_CONFIGS=$OUT/quant/fp8_gemv_tiles.json"
         --ab "shipped-$round@fp8+fp8kv")
done
timeout ${SUITE_TIMEOUT:-400} python3 benchmarks/gpu/quant_suite.py --deadline ${SUITE_DEADLINE:-390} --workloads "" --decode-batches 1 \
  --ab-batches 1 "${ARGS[@]}" --skip fp8,fp8-w8a8,fp8-nonorm,fp8-kv,w4a16,w4a16+fp8kv,w4a16-rows,w4a16-tinygemm,gptfast \
  --out "$OUT/quant" > "$OUT/quant/quant_suite.out" 2>&1
echo "quant_suite rc=$?"; grep -E "decode batch|rror" "$OUT/quant/quant_suite.out" | grep -vE "^ {4,}" | cut -c1-300
fi
rm -rf "$OUT/quant/models" "$OUT/moe/models"
