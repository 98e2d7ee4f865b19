#!/usr/bin/env bash
# The soak: each role in a process of its own (serve, ingest, relay, worker) on a fresh
# database, HTTP events at a steady rate for a while (default 300 events/s for 600 s), the
# resident memory (VmRSS) of every process sampled every 30 s and printed as a table, then
# the pipeline bench's figures (ingest-to-run p50/p99, and each minute's).
# `scripts/soak.sh [rate] [seconds]`.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-300}
seconds=${2:-600}
./scripts/services.sh
export SQLX_OFFLINE=true
cargo build --release --locked --quiet
cargo bench --locked --no-run --quiet --bench pipeline 2>/dev/null
db=kongflow_soak
psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)"
psql -h 127.0.0.1 -U postgres -d postgres -qAtc "CREATE DATABASE $db"
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db AMQP_PREFIX=kongflow-soak RUST_LOG=${SOAK_LOG:-warn}
target/release/kongflow-events migrate >/dev/null
pids=()
names=()
start() { # name port role args...
  local name=$1 port=$2; shift 2
  METRICS_ADDR=127.0.0.1:$port target/release/kongflow-events "$@" &
  pids+=($!)
  names+=("$name")
}
start serve 9571 serve --http 127.0.0.1:3032
start ingest 9572 ingest
start relay 9573 relay
start worker 9574 worker
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -sf http://127.0.0.1:3032/readyz >/dev/null && break; sleep 0.2; done
rss() { awk '/VmRSS/ {printf "%d", $2 / 1024}' "/proc/$1/status" 2>/dev/null || echo "-"; }
(
  printf "%6s" "s"; for n in "${names[@]}"; do printf " %8s" "$n"; done; echo "   (resident MB)"
  t=0
  while true; do
    printf "%6d" "$t"; for p in "${pids[@]}"; do printf " %8s" "$(rss "$p")"; done; echo
    sleep 30; t=$((t + 30))
  done
) &
sampler=$!
cargo bench --locked --quiet --bench pipeline -- --url http://127.0.0.1:3032 \
  --events $((rate * seconds)) --rate "$rate" --concurrency 64
kill $sampler 2>/dev/null || true
printf "%6s" "end"; for p in "${pids[@]}"; do printf " %8s" "$(rss "$p")"; done; echo
psql -h 127.0.0.1 -U postgres -d "$db" -qAtc \
  "SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class WHERE relname IN ('queue_jobs', 'event_records', 'job_runs') ORDER BY 1"
