#!/usr/bin/env bash
# Instruction counts of the hot path's steps under callgrind, compared with the baseline
# kept beside this script: fails when a step grows by more than 5%. Machine load does not
# move these counts, so a regression is caught on the commit that makes it.
#
#   benches/callgrind/check.sh            # compare (builds the example first)
#   benches/callgrind/check.sh --update   # rewrite the baseline from this build
#
# Each step runs N and 2N times (after the same warm-up); the difference over N is the
# cost of one steady-state iteration, without set-up. Counts depend on the CPU features
# simd-json finds, so the baseline holds one section per feature set (`cpu …` then its
# steps); --update rewrites this machine's section and keeps the others.
set -euo pipefail
cd "$(dirname "$0")/../.."
baseline=benches/callgrind/baseline.txt
tolerance=5 # percent
cargo build --release --example instruction_counts --quiet
bin="${CARGO_TARGET_DIR:-target}/release/examples/instruction_counts"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Total instructions of one run.
count() {
  local out="$tmp/$1-$2.out"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$1" "$2" >/dev/null 2>&1
  awk '/^(summary|totals):/ { print $2; exit }' "$out"
}

# The CPU features simd-json chooses its code by: counts are only comparable between
# machines that share them.
cpu=$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'avx2|avx512f|avx512bw|sse4_2|pclmulqdq|bmi2' | sort | tr '\n' ',')

declare -A per
# step and N: enough iterations that one costs a stable share of the difference.
for spec in ingest_batch:40 validate_frame:2000 index_match:2000 enqueue_1k:640 seal_64:200; do
  step=${spec%%:*} n=${spec##*:}
  one=$(count "$step" "$n")
  two=$(count "$step" $((2 * n)))
  if [ -z "$one" ] || [ -z "$two" ]; then
    echo "callgrind gave no count for $step (valgrind failed?)" >&2
    exit 1
  fi
  per[$step]=$(((two - one) / n))
done

# This machine type's section of the baseline.
section() { awk -v cpu="$cpu" '$1 == "cpu" { mine = ($2 == cpu); next } mine' "$baseline"; }

if [ "${1:-}" = --update ]; then
  others=$(awk -v cpu="$cpu" '$1 == "cpu" { skip = ($2 == cpu) } !skip' "$baseline" 2>/dev/null || true)
  {
    [ -n "$others" ] && echo "$others"
    echo "cpu $cpu"
    for step in ingest_batch validate_frame index_match enqueue_1k seal_64; do echo "$step ${per[$step]}"; done
  } >"$tmp/baseline"
  mv "$tmp/baseline" "$baseline"
  echo "baseline written:"; cat "$baseline"
  exit 0
fi

if [ -z "$(section)" ]; then
  echo "the baseline has no section for this CPU's features [$cpu]:"
  echo "counts are not comparable, so not compared; run $0 --update on this machine type."
  for step in "${!per[@]}"; do echo "$step ${per[$step]}"; done
  exit 0
fi

status=0
printf '%-16s %14s %14s %8s\n' step baseline now change
while read -r step base; do
  now=${per[$step]:?no measurement for $step}
  change=$(awk -v a="$base" -v b="$now" 'BEGIN { printf "%+.2f", (b - a) * 100 / a }')
  verdict=ok
  if awk -v c="$change" -v t="$tolerance" 'BEGIN { exit !(c > t) }'; then
    verdict="REGRESSION (> +$tolerance%)"
    status=1
  fi
  printf '%-16s %14s %14s %7s%%  %s\n' "$step" "$base" "$now" "$change" "$verdict"
done < <(section)
exit $status
