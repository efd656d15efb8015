#!/usr/bin/env bash
# Reproduces the tables in docs/benchmarks.md in one run: the plan
# loadtest/plans/benchmarks.toml (every subscriber scenario against the relay, the
# baseline and the limit server, alternating, medians of N rounds; idle memory per
# connection), then ingest and the criterion benches, which are not subscriber scenarios.
# Usage: loadtest/run-benchmarks.sh [rounds] [out-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
out=${2:-loadtest-report}
cargo build --release --workspace
lt=target/release/krux-loadtest
mkdir -p "$out"

# Exit 99 if a scenario lost anything (its thresholds); the figures are in $out/plan.
$lt plan loadtest/plans/benchmarks.toml --rounds "$rounds" --out "$out/plan" | tee "$out/plan.txt"

# Ingest end to end (TCP in -> ring), no subscribers, default flags: relay and baseline.
$lt ingest --events 2000000 --out "$out/ingest" | tee "$out/ingest.txt"

# Ingest validate+frame on one core.
cargo bench --bench hot_path -- --warm-up-time 2 --measurement-time 5 | tee "$out/criterion.txt"
