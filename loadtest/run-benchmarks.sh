#!/usr/bin/env bash
# Reproduces the tables in docs/benchmarks.md: every scenario against the relay, the
# baseline and the limit server, alternating, medians of N rounds, in one run.
# Usage: loadtest/run-benchmarks.sh [rounds] [out-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
out=${2:-loadtest-report}
cargo build --release --workspace
lt=target/release/krux-loadtest
mkdir -p "$out"

relay_max() { # events/s of the relay's median in a compare report
  python3 -c "import json; m=json.load(open('$1'))['medians']; print(int([r for r in m if r['target']=='relay'][0]['events_in_per_s']))"
}

# Server threads: 1 leaves the second core to the load client; 2 is one per core (the
# servers' default), sharing both cores with the client.
for threads in 1 2; do
  for subs in 100 1000 10000; do
    $lt compare --threads "$threads" --subscribers "$subs" --rate max --window 1000 \
      --warmup 2s --duration 10s --rounds "$rounds" --out "$out/fanout-$subs-t$threads" \
      | tee "$out/fanout-$subs-t$threads.txt"
  done
  # p99 at half the relay's max rate (1,000 subscribers).
  max=$(relay_max "$out/fanout-1000-t$threads/compare.json")
  $lt compare --threads "$threads" --subscribers 1000 --rate $((max / 2)) --warmup 2s \
    --duration 10s --rounds "$rounds" --out "$out/latency-half-max-t$threads" \
    | tee "$out/latency-half-max-t$threads.txt"
done

# 19,000 subscribers: the client splits its sockets over 2 worker processes (a process may
# open 20,000 files here, the servers included, so this is about the most one server holds).
$lt compare --threads 1 --subscribers 19000 --rate max --window 1000 --warmup 2s \
  --duration 10s --rounds "$rounds" --out "$out/fanout-19000-t1" | tee "$out/fanout-19000-t1.txt"

# RSS per idle connection with 10,000 subscribers.
for kind in relay baseline limit; do
  $lt run --spawn "$kind" --subscribers 10000 --idle --out "$out/idle-$kind" | tee -a "$out/idle.txt"
done

# Ingest end to end (TCP in -> ring), no subscribers, default flags: relay and baseline.
$lt ingest --events 2000000 --out "$out/ingest" | tee "$out/ingest.txt"

# Ingest validate+frame on one core.
cargo bench --bench hot_path -- --warm-up-time 2 --measurement-time 5 | tee "$out/criterion.txt"
