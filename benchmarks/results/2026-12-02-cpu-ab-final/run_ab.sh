#!/bin/bash
# Alternate the tree before the seam (.old = d4b80c2) and the tree after (HEAD): CPU offline suite, serving a and b.
set -u
OUT=$OUT
mkdir -p $OUT
for round in 1 2 3 4; do
  if [ $((round % 2)) = 1 ]; then order="before after"; else order="after before"; fi
  for t in $order; do
    dir=$([ $t = before ] && echo $BEFORE_TREE || echo $REPO)
    export TORCH_EXTENSIONS_DIR=$TMP/tx-ab-$t
    (cd $REPO/benchmarks && PYTHONPATH=$dir python3 offline_throughput.py --engine inferneo --label "$t round $round" --out $OUT/offline.jsonl > $OUT/offline_${t}_$round.log 2>&1)
    port=$((8200 + round))
    (cd $dir && PYTHONPATH=$dir nohup python3 -m inferneo.cli serve --port $port --disable-access-log > $OUT/server_${t}_$round.log 2>&1 &)
    for i in $(seq 1 180); do curl -s localhost:$port/health > /dev/null && break; sleep 1; done
    (cd $REPO/benchmarks && python3 serving_throughput.py --base-url http://127.0.0.1:$port --scenario a --label "$t round $round" --out $OUT/serving.jsonl > /dev/null 2>&1)
    (cd $REPO/benchmarks && python3 serving_throughput.py --base-url http://127.0.0.1:$port --scenario b --label "$t round $round" --out $OUT/serving.jsonl > /dev/null 2>&1)
    pkill -f "inferneo.cli serve --port $port"; sleep 3
    echo "$t round $round done $(date +%T)"
  done
done
