#!/usr/bin/env bash
# Reproduces the table in docs/benchmarks.md: every scenario against the relay, the
# baseline and the limit server, alternating, medians of N rounds, in one run.
# Usage: loadtest/run-benchmarks.sh [rounds] [out-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
out=${2:-loadtest-report}
cargo build --release --workspace
lt=target/release/krux-loadtest

for subs in 100 1000 10000; do
  $lt compare --subscribers "$subs" --rate max --window 1000 --warmup 2s --duration 10s \
    --rounds "$rounds" --out "$out/fanout-$subs" | tee "$out-fanout-$subs.txt"
done

# p99 at half the relay's max rate (1,000 subscribers): read the relay's median from above.
max=$(python3 -c "import json,sys; m=json.load(open('$out/fanout-1000/compare.json'))['medians']; print(int([r for r in m if r['target']=='relay'][0]['events_in_per_s']))")
$lt compare --subscribers 1000 --rate $((max / 2)) --warmup 2s --duration 10s \
  --rounds "$rounds" --out "$out/latency-half-max" | tee "$out-latency.txt"

# RSS per idle connection with 10,000 subscribers.
for kind in relay baseline limit; do
  $lt run --spawn "$kind" --subscribers 10000 --idle --out "$out/idle-$kind" | tee -a "$out-idle.txt"
done

# Ingest validate+frame on one core.
cargo bench --bench hot_path -- --warm-up-time 2 --measurement-time 5 | tee "$out-criterion.txt"
