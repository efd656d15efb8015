#!/usr/bin/env bash
# TLS fan-out against the TLS limit (docs/benchmarks.md, *TLS*): per round, the relay with
# 1,000 subscribers at max rate in plaintext, then over TLS, then `openssl speed` for
# AES-256-GCM (the suite the load client negotiates). The limit's CPU per delivery is the
# plaintext run's plus the AES-GCM cost of the bytes of one delivery; the figure is TLS
# deliveries per server CPU-second over the limit's.
# Usage: loadtest/tls-limit.sh [rounds] [out-dir] [-- extra krux-loadtest run flags]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
out=${2:-tls-limit}
shift $(($# < 2 ? $# : 2))
[ "${1:-}" = "--" ] && shift
lt=target/release/krux-loadtest
[ -x "$lt" ] || cargo build --release --workspace
mkdir -p "$out"

printf '%s\n' "round,aes_gb_s,plain_per_cpu_s,limit_per_cpu_s,tls_per_cpu_s,of_limit_pct,plain_loss,tls_loss"
for r in $(seq 1 "$rounds"); do
  $lt run --spawn relay --subscribers 1000 --duration 10s "$@" --out "$out/plain-$r" >/dev/null 2>>"$out/runs.log"
  $lt run --spawn relay --subscribers 1000 --duration 10s --tls "$@" --out "$out/tls-$r" >/dev/null 2>>"$out/runs.log"
  # The last line's last field: bytes per second (in thousands) for 16 KiB blocks.
  aes_k=$(openssl speed -evp aes-256-gcm -bytes 16384 -seconds 3 2>/dev/null | tail -1 | awk '{print $NF}' | tr -d k)
  python3 - "$r" "$aes_k" "$out" <<'PY'
import json, sys
r, aes, out = sys.argv[1], float(sys.argv[2]) * 1000, sys.argv[3]
p = json.load(open(f"{out}/plain-{r}/run.json"))
t = json.load(open(f"{out}/tls-{r}/run.json"))
per_delivery = 1 / p["deliveries_per_server_cpu_s"] + t["wire_bytes_per_delivery"] / aes
tls = t["deliveries_per_server_cpu_s"]
print(f"{r},{aes / 1e9:.2f},{p['deliveries_per_server_cpu_s']:.0f},{1 / per_delivery:.0f},"
      f"{tls:.0f},{tls * per_delivery * 100:.0f},{p['lost']},{t['lost']}", flush=True)
PY
done
