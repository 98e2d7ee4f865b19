#!/usr/bin/env bash
# The benchmarks: start `kongflow-events all` (release build) on a fresh database, then run
#   pipeline: the Postgres baseline (below), benches/pipeline.rs flat out (20,000 events,
#             16 and 64 connections) and at offered 300, 500 and 2,000 events/s (20 s each);
#   delays:   benches/delays.rs, 10,000 events due 1-60 s after their send, with 200
#             immediate events/s alongside; prints lateness.
#   tiers:    benches/tiers.rs, the delay tiers alone (RabbitMQ, no database): lateness
#             of 2,000 messages due within 5 s, by number of hops.
#   ingest:   the Postgres baseline (pgbench, 16 clients, one event row + one outbox row
#             per transaction), then benches/ingest.rs: RabbitMQ alone and AMQP ingest
#             flat out (50,000 messages, 16 and 4 publishers), and publish-to-run latency
#             at an offered 500 events/s.
#   fairness: benches/fairness.rs: ten quiet environments at 20 events/s each, alone and
#             while another floods 20,000 events; with the default shares, with A's ingest
#             rate held too, then without shares. SHARD_COUNT (the service's) applies.
#   retention: ingest while retention removes: the pipeline (RETENTION_EVENTS events,
#             default 80,000, long enough to hold the slice's drop and part of its keys'
#             forgetting; 16 and 64 connections) right after 1,000,000 old settled events
#             (and a run each) are planted with retention held off: "alone" with retention still held, "beside"
#             with it let go as the run starts, so retention (every 5 s here) removes them
#             during the run; pairings a connection count, each in the other order than the one
#             before; prints what retention removed during each run (events, keys), and
#             after it the keys the bench forgot for it. RETENTION_CLIENTS
#             (default "16 64") picks the connection counts, RETENTION_PAIRINGS (default 2)
#             the pairings; PLANT_KEYS=0 plants the old events without their event_keys
#             (retention then only drops the slice).
#   compare REV [ROUNDS]: the regression guard. Builds REV (a commit) beside the working
#             tree, each with its own bench client, runs ../shared/bench/anchors.sh (when
#             present) once, then alternates the two builds ROUNDS times (default 2) on the
#             pipeline bench: flat out at 16 and 64 connections (10,000 events) and paced at
#             200 events/s (16 connections) and 500 (32), a fresh database per run,
#             each run after a warm-up of 400 events in the same process.
#   costs [EVENTS RATE]: what one event costs (statements, WAL, row versions, broker
#             messages, CPU per process) on a Postgres of its own with pg_stat_statements;
#             without arguments flat out, flat out on quorum queues and paced at 300/s,
#             merged into target/costs.json (docs/scaling.md, scripts/scale-plan.py).
#   deadrows [MINUTES RATE]: live and dead rows of every table over a paced run (10 minutes
#             at 300 events/s) with retention deleting all through it.
#   partitions: retention by DELETE against dropping a partition, Postgres alone: pgbench
#             ingest (an event and its run) while 1,000,000 old events go, each way.
#   console:  the operator console's page times on 1,000,000 events and 2,000,000 jobs
#             (benches/console_pages.py).
#   sizing [RATE...]: CPU and memory per role (serve, relay, worker as separate processes,
#             Postgres, RabbitMQ) paced at each rate (default 250 and 500 events/s), as
#             cores per 1,000 events/s and peak resident memory: the chart's sizing.
# `scripts/bench.sh [pipeline|delays|tiers|ingest|fairness|retention|all] [extra arguments]`
# (default all), `scripts/bench.sh compare REV [ROUNDS]`, `scripts/bench.sh sizing [RATE...]` or
# `scripts/bench.sh console` or `scripts/bench.sh costs [EVENTS RATE]`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Postgres over plain TCP in every run, the anchors' and the baseline's included: since
# 0.2.0 the service speaks TLS to a server that offers it (libpq's sslmode=prefer, and
# Debian's Postgres offers it), which costs a fifth of the flat-out rate on loopback here
# (docs/benchmarks.md) and which builds before 0.2.0 cannot speak. `sizing` keeps the
# default: production runs over TLS. BENCH_SSLMODE=prefer measures with TLS.
export PGSSLMODE=${BENCH_SSLMODE:-disable}
which="${1:-all}"
shift || true
./scripts/services.sh
# drop_queues PREFIX: delete every queue named PREFIX.*, in one call (one rabbitmqctl per
# queue took half a minute). A run's database is fresh, so its installation is new: the
# queues of an earlier run under the same prefix would make the service refuse to start.
drop_queues() {
  rabbitmqctl -q eval "P = <<\"$1.\">>, lists:foreach(fun(Q) ->
      {resource, _, queue, N} = amqqueue:get_name(Q),
      case binary:match(N, P) of {0, _} -> rabbit_amqqueue:delete(Q, false, false, <<\"bench\">>); _ -> ok end
    end, rabbit_amqqueue:list()), ok." >/dev/null 2>&1 || true
}
# The newest pipeline bench client built under a target directory: `client_of target`.
client_of() { ls -t "$1"/release/deps/pipeline-* | grep -v '\.d$' | head -1; }
# serve (API on 127.0.0.1:3031), relay and worker as the chart runs them, as separate
# processes on the environment's stores, metrics on 3041-3043; returns once each is ready,
# their pids in ROLE_PID (sizing, costs).
start_roles() {
  declare -gA ROLE_PID
  local -A port=([serve]=3041 [relay]=3042 [worker]=3043)
  local role
  target/release/kongflow-events serve --http 127.0.0.1:3031 --metrics 127.0.0.1:3041 >/dev/null 2>&1 &
  ROLE_PID[serve]=$!
  for role in relay worker; do
    METRICS_ADDR=127.0.0.1:${port[$role]} target/release/kongflow-events "$role" >/dev/null 2>&1 &
    ROLE_PID[$role]=$!
  done
  for role in serve relay worker; do
    for _ in $(seq 1 100); do curl -sf http://127.0.0.1:${port[$role]}/readyz >/dev/null && break; sleep 0.2; done
  done
}
# Cumulative CPU ticks of processes: `ticks PID...`, or of a user's: `ticks -u USER`
# (sizing, costs).
ticks() {
  if [ "$1" = -u ]; then set -- $(pgrep -u "$2"); fi
  local t=0 p
  for p in "$@"; do
    [ -r /proc/$p/stat ] && t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat)))
  done
  echo $t
}
if [[ $which == compare ]]; then
  rev=$(git rev-parse --short "${1:?compare needs a commit: scripts/bench.sh compare REV}")
  rounds=${2:-2}
  export SQLX_OFFLINE=true
  unset DATABASE_URL
  tree=target/compare/$rev
  [ -d "$tree" ] || git worktree add --detach -q "$tree" "$rev"
  echo "== building $rev (in $tree) and the working tree"
  # Every REV builds in one target directory (the dependencies compile once), its two
  # programs then copied beside its tree.
  shared=$PWD/target/compare/target
  (cd "$tree" && CARGO_TARGET_DIR=$shared cargo build --release --quiet --bin kongflow-events --bench pipeline)
  mkdir -p "$tree/bin"
  cp "$shared/release/kongflow-events" "$tree/bin/kongflow-events"
  cp "$(client_of "$shared")" "$tree/bin/pipeline"
  cargo build --release --locked --quiet --bin kongflow-events --bench pipeline
  declare -A bin client
  bin[$rev]=$tree/bin/kongflow-events client[$rev]=$tree/bin/pipeline
  bin[work]=target/release/kongflow-events client[work]=$(client_of target)
  anchors=../shared/bench/anchors.sh
  [ -x "$anchors" ] && { echo "== anchors"; "$anchors" all; }
  one() { # one <build> <events> <connections> [client arguments]: a run on a fresh database
    local b=$1 n=$2 c=$3 db=kongflow_compare
    shift 3
    PGOPTIONS="-c client_min_messages=warning" psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" \
      -c "CREATE DATABASE $db" >/dev/null
    (
      export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db AMQP_PREFIX=kongflow-compare-$RANDOM
      export HTTP_ADDR=127.0.0.1:3031 METRICS_ADDR=127.0.0.1:3032 METRICS_URL=http://127.0.0.1:3032 RUST_LOG=warn
      "${bin[$b]}" migrate >/dev/null
      "${bin[$b]}" all >/dev/null 2>&1 &
      pid=$!
      for _ in $(seq 1 100); do curl -sf http://$HTTP_ADDR/healthz >/dev/null && break; sleep 0.2; done
      # A warm-up run first (its own environment; 2 s at 200 events/s): a process's first
      # second pays its connections, topology declarations and first plans (ingest-to-run
      # up to 0.5 s), which is not the steady state either build is compared on.
      "${client[$b]}" --url http://$HTTP_ADDR --events 400 --concurrency 16 --rate 200 >/dev/null 2>&1
      "${client[$b]}" --url http://$HTTP_ADDR --events "$n" --concurrency "$c" "$@" 2>&1 |
        grep -E "^(end to end|ingest-to-run|request)" | sed "s/^/  /"
      kill $pid; wait $pid 2>/dev/null || true
      drop_queues "$AMQP_PREFIX"
    )
  }
  for round in $(seq 1 "$rounds"); do
    # Alternate which build goes first, round by round.
    order=("$rev" work)
    (( round % 2 == 0 )) && order=(work "$rev")
    for setting in "10000 16" "10000 64" "3000 16 --rate 200" "7500 32 --rate 500"; do
      for b in "${order[@]}"; do
        echo "== round $round, $b: ${setting} ($(date -u +%H:%M:%S))"
        one "$b" $setting
      done
    done
  done
  exit 0
fi
if [[ $which == sizing ]]; then
  # CPU and memory per role: serve, relay and worker as separate processes (as the chart
  # runs them), paced at each rate given (default 250 and 500 events/s) for 40 s each, on a
  # fresh database; each process's CPU time (and Postgres's and RabbitMQ's) over the run,
  # as cores per 1,000 events/s, and its peak resident memory.
  rates=("$@")
  [ ${#rates[@]} -gt 0 ] || rates=(250 500)
  export PGSSLMODE=${BENCH_SSLMODE:-prefer}
  export SQLX_OFFLINE=true
  unset DATABASE_URL
  cargo build --release --locked --quiet --bin kongflow-events --bench pipeline
  client=$(client_of target)
  hz=$(getconf CLK_TCK)
  for rate in "${rates[@]}"; do
    db=kongflow_sizing
    psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
    (
      export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db AMQP_PREFIX=kongflow-sizing-$RANDOM
      export RUST_LOG=warn KONGFLOW_NO_MIGRATE=true
      target/release/kongflow-events migrate >/dev/null
      start_roles
      "$client" --url http://127.0.0.1:3031 --events 400 --concurrency 16 --rate 200 >/dev/null 2>&1
      declare -A before
      for role in serve relay worker; do before[$role]=$(ticks ${ROLE_PID[$role]}); done
      # The machine: busy and stolen ticks (/proc/stat), to read the rest against.
      machine() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $9}' /proc/stat; }
      read -r busy0 steal0 < <(machine)
      pg0=$(ticks -u postgres) mq0=$(ticks -u rabbitmq) start=$(date +%s.%N)
      "$client" --url http://127.0.0.1:3031 --events $((rate * 40)) --concurrency 16 --rate "$rate" 2>&1 |
        grep -E "^(end to end|ingest-to-run)" | sed "s/^/  /"
      secs=$(echo "$(date +%s.%N) - $start" | bc)
      echo "== $rate events/s for ${secs%.*} s: cores per 1,000 events/s, peak memory"
      per1000() { echo "scale=3; ($1) / $hz / $secs * 1000 / $rate" | bc; }
      for role in serve relay worker; do
        rss=$(awk '/VmHWM/ {print int($2 / 1024)}' /proc/${ROLE_PID[$role]}/status)
        printf '  %-9s %s cores  %s MiB\n' "$role" "$(per1000 "$(ticks ${ROLE_PID[$role]}) - ${before[$role]}")" "$rss"
      done
      printf '  %-9s %s cores\n' postgres "$(per1000 "$(ticks -u postgres) - $pg0")"
      printf '  %-9s %s cores\n' rabbitmq "$(per1000 "$(ticks -u rabbitmq) - $mq0")"
      read -r busy1 steal1 < <(machine)
      printf '  %-9s %s cores busy, %s stolen (all processes, the client included)\n' machine \
        "$(per1000 "$busy1 - $busy0")" "$(per1000 "$steal1 - $steal0")"
      kill "${ROLE_PID[@]}"
      wait 2>/dev/null || true
      drop_queues "$AMQP_PREFIX"
    )
  done
  exit 0
fi
if [[ $which == costs ]]; then
  # What one event costs, for docs/scaling.md and scripts/scale-plan.py: serve, relay and
  # worker as separate processes (as the chart runs them) on a Postgres of the run's own
  # (port 5434, pg_stat_statements loaded, autovacuum on as in production; the machine's
  # server cannot load the extension without a restart), paced at RATE (default 300)
  # events/s (0: flat out) with 16 connections for EVENTS. Counted from after a
  # warm-up to after the last run's hand-off is published: statements by pg_stat_statements
  # (the bench client's own polls, made as another role, left out), transactions, WAL
  # (pg_stat_wal), row versions written (pg_stat_user_tables), broker messages (RabbitMQ's
  # global counters), CPU time per process. Writes the figures as JSON to COSTS_OUT
  # (default target/costs.json).
  # Without arguments: three runs (flat out, flat out on quorum queues, paced at 300/s)
  # merged into target/costs.json, the file docs/scaling-costs.json keeps.
  if [ $# = 0 ]; then
    COSTS_OUT=target/costs-flat.json "$0" costs 20000 0
    AMQP_QUEUE_TYPE=quorum COSTS_OUT=target/costs-quorum.json "$0" costs 20000 0
    COSTS_OUT=target/costs-300.json "$0" costs 12000 300
    python3 -c 'import json, sys; json.dump({k: json.load(open(f)) for k, f in zip(
        ("flat", "quorum", "paced_300"), sys.argv[1:])}, sys.stdout, indent=1)' \
      target/costs-flat.json target/costs-quorum.json target/costs-300.json > target/costs.json
    echo "== merged into target/costs.json"
    exit 0
  fi
  events=$1 rate=${2:-300}
  out=${COSTS_OUT:-target/costs.json}
  export SQLX_OFFLINE=true
  unset DATABASE_URL
  cargo build --release --locked --quiet --bin kongflow-events --bench pipeline
  client=$(client_of target)
  pgbin=/usr/lib/postgresql/$(ls /etc/postgresql | sort -n | tail -1)/bin
  data=/tmp/kongflow-costs-pg port=5434
  pgctl() { su postgres -s /bin/sh -c "$pgbin/pg_ctl -D $data $*"; }
  [ -f $data/postmaster.pid ] && pgctl "-m fast -w stop" >/dev/null 2>&1 || true
  rm -rf $data && mkdir -p $data && chown postgres: $data
  su postgres -s /bin/sh -c "$pgbin/initdb -D $data -A trust -U postgres" >/dev/null
  cat >> $data/postgresql.conf <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '/tmp'
max_connections = 200
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
CONF
  pgctl "-l $data/log -w start" >/dev/null
  trap 'pgctl "-m fast -w stop" >/dev/null 2>&1 || true' EXIT
  db=kongflow_costs
  q() { psql -h 127.0.0.1 -p $port -U postgres -d $db -qAtc "$1"; }
  psql -h 127.0.0.1 -p $port -U postgres -d postgres -qAtc "CREATE DATABASE $db" \
    -c "CREATE ROLE bench_client LOGIN SUPERUSER" >/dev/null
  q "CREATE EXTENSION pg_stat_statements"
  hz=$(getconf CLK_TCK)
  broker() { # messages published (received), delivered, acknowledged: every queue type
    rabbitmqctl -q eval 'M = rabbit_global_counters:overview(),
      Sum = fun(K) -> maps:fold(fun(L, V, A) -> case lists:member({protocol, amqp091}, L) of
        true -> A + maps:get(K, V, 0); false -> A end end, 0, M) end,
      io:format("~b ~b ~b~n", [Sum(messages_received_total), Sum(messages_delivered_total),
        Sum(messages_acknowledged_total)]).' | head -1
  }
  export DATABASE_URL=postgres://postgres@127.0.0.1:$port/$db AMQP_PREFIX=kongflow-costs
  export RUST_LOG=warn KONGFLOW_NO_MIGRATE=true
  drop_queues "$AMQP_PREFIX"
  target/release/kongflow-events migrate >/dev/null
  trap 'kill ${ROLE_PID[*]} 2>/dev/null; wait 2>/dev/null; pgctl "-m fast -w stop" >/dev/null 2>&1 || true' EXIT
  start_roles
  client_url=postgres://bench_client@127.0.0.1:$port/$db
  DATABASE_URL=$client_url "$client" --url http://127.0.0.1:3031 --events 400 --concurrency 16 --rate 200 >/dev/null 2>&1
  settled() { q "SELECT (SELECT count(*) FROM run_handoffs) + (SELECT count(*) FROM queue_jobs
                 WHERE state NOT IN ('completed', 'discarded', 'cancelled') OR published_at IS NULL)"; }
  for _ in $(seq 1 100); do [ "$(settled)" = 0 ] && break; sleep 0.2; done
  sleep 11
  q "SELECT pg_stat_statements_reset(), pg_stat_reset_shared('wal'), pg_stat_reset()" >/dev/null
  declare -A before
  for role in serve relay worker; do before[$role]=$(ticks ${ROLE_PID[$role]}); done
  pg0=$(ticks -u postgres) mq0=$(ticks -u rabbitmq) start=$(date +%s.%N)
  read -r pub0 del0 ack0 < <(broker)
  echo "== costs: $events events at ${rate/#0/flat out} events/s, 16 connections ($(date -u +%H:%M:%S))"
  pace=(--rate "$rate")
  [ "$rate" = 0 ] && pace=()
  DATABASE_URL=$client_url "$client" --url http://127.0.0.1:3031 --events "$events" --concurrency 16 \
    "${pace[@]}" 2>&1 | grep -E "^(end to end|ingest-to-run)" | sed "s/^/  /"
  for _ in $(seq 1 300); do [ "$(settled)" = 0 ] && break; sleep 0.2; done
  secs=$(echo "$(date +%s.%N) - $start" | bc)
  read -r pub1 del1 ack1 < <(broker)
  declare -A cpu
  for role in serve relay worker; do cpu[$role]=$(($(ticks ${ROLE_PID[$role]}) - ${before[$role]})); done
  cpu[postgres]=$(($(ticks -u postgres) - pg0)) cpu[rabbitmq]=$(($(ticks -u rabbitmq) - mq0))
  ms() { echo "scale=4; $1 * 1000 / $hz / $events" | bc; }
  # The statements, the WAL and the rows: one JSON object, the per-event figures computed
  # in SQL, the CPU and broker figures passed in.
  # A backend reports its table and WAL counts when idle for 10 s at most.
  sleep 11
  q "WITH me AS (SELECT oid FROM pg_roles WHERE rolname = 'bench_client'),
       s AS (SELECT * FROM pg_stat_statements WHERE userid <> (SELECT oid FROM me)
             AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())),
       tx AS (SELECT sum(calls) AS n FROM s WHERE query IN ('COMMIT', 'commit')),
       t AS (SELECT relname, n_tup_ins + n_tup_upd + n_tup_del AS versions, n_tup_ins, n_tup_upd,
                    n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables)
     SELECT json_build_object(
       'measured_at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI \"UTC\"'),
       'events', $events, 'offered_rate', $rate, 'seconds', round($secs::numeric, 1),
       'statements_per_event', round((SELECT sum(calls) FROM s WHERE toplevel) / $events::numeric, 2),
       'nested_statements_per_event', round((SELECT sum(calls) FROM s WHERE NOT toplevel) / $events::numeric, 2),
       'commits_per_event', round((SELECT n FROM tx) / $events::numeric, 2),
       'statement_ms_per_event', round((SELECT sum(total_exec_time) FROM s)::numeric / $events, 4),
       'wal_bytes_per_event', round((SELECT wal_bytes FROM pg_stat_wal) / $events, 0),
       'wal_records_per_event', round((SELECT wal_records FROM pg_stat_wal) / $events::numeric, 2),
       'wal_fpi_per_event', round((SELECT wal_fpi FROM pg_stat_wal) / $events::numeric, 3),
       'row_versions_per_event', round((SELECT sum(versions) FROM t) / $events::numeric, 2),
       'rows_by_table', (SELECT json_object_agg(relname, json_build_object(
           'inserted', round(n_tup_ins / $events::numeric, 3), 'updated', round(n_tup_upd / $events::numeric, 3),
           'hot', round(n_tup_hot_upd / $events::numeric, 3), 'deleted', round(n_tup_del / $events::numeric, 3)))
         FROM t WHERE versions > 0),
       'broker_published_per_event', round(($pub1 - $pub0) / $events::numeric, 2),
       'broker_delivered_per_event', round(($del1 - $del0) / $events::numeric, 2),
       'broker_acked_per_event', round(($ack1 - $ack0) / $events::numeric, 2),
       'cpu_ms_per_event', json_build_object('postgres', $(ms ${cpu[postgres]}), 'rabbitmq',
         $(ms ${cpu[rabbitmq]}), 'serve', $(ms ${cpu[serve]}), 'relay', $(ms ${cpu[relay]}),
         'worker', $(ms ${cpu[worker]})),
       'top_statements', (SELECT json_agg(x) FROM (
           SELECT left(regexp_replace(query, '\s+', ' ', 'g'), 90) AS query,
                  round(calls / $events::numeric, 3) AS per_event,
                  round(mean_exec_time::numeric, 3) AS mean_ms,
                  round(wal_bytes / $events, 0) AS wal_bytes_per_event
           FROM s ORDER BY total_exec_time DESC LIMIT 15) x))" > "$out"
  python3 - "$out" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print(f"  {c['events']} events in {c['seconds']} s (offered {c['offered_rate']}/s), per event:")
for k in ("statements_per_event", "nested_statements_per_event", "commits_per_event", "statement_ms_per_event", "wal_bytes_per_event",
          "wal_records_per_event", "wal_fpi_per_event", "row_versions_per_event",
          "broker_published_per_event", "broker_delivered_per_event", "broker_acked_per_event"):
    print(f"  {k:<28} {c[k]}")
print("  cpu ms per event           ", ", ".join(f"{k} {v}" for k, v in c["cpu_ms_per_event"].items()))
print("  rows by table (inserted/updated/hot/deleted per event):")
for t, r in sorted(c["rows_by_table"].items()):
    print(f"    {t:<22} {r['inserted']:>6} {r['updated']:>6} {r['hot']:>6} {r['deleted']:>6}")
print("  statements by total time (per event, mean ms, WAL bytes per event):")
for s in c["top_statements"]:
    print(f"    {s['per_event']:>6} {s['mean_ms']:>7} {s['wal_bytes_per_event']:>6}  {s['query']}")
PY
  echo "   written to $out"
  drop_queues "$AMQP_PREFIX"
  exit 0
fi
if [[ $which == partitions ]]; then
  # What retention by partitions buys, Postgres alone (docs/scaling.md): the ingest of an
  # event and its run (one transaction, pgbench, 16 and 64 clients, 20 s) into the
  # service's tables as they are, alone and while 1,000,000 old events and their runs are
  # deleted as retention deletes them (1,000 events per statement, each its own
  # transaction, then the vacuum that the deletes owe); then into copies of the tables
  # range-partitioned by creation time (the same indexes, keys widened by the partition
  # key), alone and while the old partition holding 1,000,000 events and their runs is
  # detached (CONCURRENTLY) and dropped. Then each retention alone: its time and its WAL.
  export SQLX_OFFLINE=true
  cargo build --release --locked --quiet --bin kongflow-events
  db=kongflow_partitions
  export PGOPTIONS="-c client_min_messages=warning"
  psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db KONGFLOW_NO_MIGRATE=true
  # The service's tables plain, as before `storage partition` (`migrate` slices a new
  # installation's): the migrations applied as they are.
  for f in migrations/*.sql; do psql -h 127.0.0.1 -U postgres -d $db -q -v ON_ERROR_STOP=1 -f "$f" >/dev/null; done
  env_id=$(target/release/kongflow-events env create bench/partitions/e | sed -n 's/.* id \([0-9a-f-]*\)$/\1/p')
  q() { psql -h 127.0.0.1 -U postgres -d $db -qAt -v ON_ERROR_STOP=1 -c "$1"; }
  cut=$(q "SELECT now() - interval '1 day'")
  q "CREATE TABLE ev_part (LIKE event_records INCLUDING DEFAULTS) PARTITION BY RANGE (created_at);
     ALTER TABLE ev_part ADD PRIMARY KEY (id, created_at);
     CREATE UNIQUE INDEX ON ev_part (environment_id, event_id, created_at);
     CREATE INDEX ON ev_part (environment_id, timestamp, id);
     CREATE TABLE rn_part (LIKE job_runs INCLUDING DEFAULTS) PARTITION BY RANGE (created_at);
     ALTER TABLE rn_part ADD PRIMARY KEY (id, created_at);
     CREATE UNIQUE INDEX ON rn_part (event_record_id, dispatcher_id, job_version_id, created_at);
     CREATE INDEX ON rn_part (environment_id, created_at);
     CREATE TABLE ev_part_now PARTITION OF ev_part FOR VALUES FROM ('$cut')
       TO (now() + interval '1 day') WITH (fillfactor = 90);
     CREATE TABLE rn_part_now PARTITION OF rn_part FOR VALUES FROM ('$cut')
       TO (now() + interval '1 day');
     CREATE PROCEDURE retain_by_delete() LANGUAGE plpgsql AS \$\$
     DECLARE n int;
     BEGIN
       LOOP
         WITH d AS (DELETE FROM event_records WHERE id IN (
                      SELECT id FROM event_records WHERE created_at < now() - interval '30 days'
                      AND delivered_at IS NOT NULL LIMIT 1000) RETURNING id),
              r AS (DELETE FROM job_runs WHERE event_record_id IN (SELECT id FROM d))
         SELECT count(*) INTO n FROM d;
         COMMIT;
         EXIT WHEN n < 1000;
       END LOOP;
     END \$\$;"
  plant() { # plant EVENTS RUNS: 1,000,000 delivered events of 40 days ago and a run each
    local ev=$1 rn=$2
    [ "$ev" = ev_part ] && q "CREATE TABLE ev_part_old PARTITION OF ev_part FOR VALUES
        FROM (MINVALUE) TO ('$cut') WITH (fillfactor = 90);
      CREATE TABLE rn_part_old PARTITION OF rn_part FOR VALUES FROM (MINVALUE) TO ('$cut')"
    q "INSERT INTO $ev (id, environment_id, event_id, name, payload, created_at, deliver_at, delivered_at)
       SELECT gen_random_uuid(), '$env_id', 'old-' || g, 'bench.old', '{\"kind\": \"old\"}',
              now() - interval '40 days', now() - interval '40 days', now() - interval '40 days'
       FROM generate_series(1, 1000000) g;
       INSERT INTO $rn (id, environment_id, job_id, job_version_id, event_record_id, dispatcher_id, created_at)
       SELECT gen_random_uuid(), environment_id, gen_random_uuid(), gen_random_uuid(), id,
              gen_random_uuid(), created_at FROM $ev WHERE name = 'bench.old';
       ANALYZE $ev; ANALYZE $rn; CHECKPOINT"
  }
  retain() { # the retention of a layout, timed; prints seconds and WAL bytes
    local start lsn
    lsn=$(q "SELECT pg_current_wal_lsn()") start=$(date +%s.%N)
    if [ "$1" = ev_part ]; then
      q "ALTER TABLE ev_part DETACH PARTITION ev_part_old CONCURRENTLY"
      q "ALTER TABLE rn_part DETACH PARTITION rn_part_old CONCURRENTLY"
      q "DROP TABLE ev_part_old, rn_part_old"
    else
      q "CALL retain_by_delete()"
      q "VACUUM event_records, job_runs"
    fi
    echo "$(echo "$(date +%s.%N) - $start" | bc | cut -c1-5) s, WAL $(q "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '$lsn')::bigint / 1048576") MiB"
  }
  ingest() { # ingest EVENTS RUNS CLIENTS: pgbench for 20 s, prints transactions per second
    cat > target/pgbench-partitions.sql <<SQL
BEGIN;
INSERT INTO $1 (id, environment_id, event_id, name, payload)
VALUES (gen_random_uuid(), '$env_id', gen_random_uuid()::text, 'bench.event', '{"kind": "bench"}')
RETURNING id AS ev \gset
INSERT INTO $2 (id, environment_id, job_id, job_version_id, event_record_id, dispatcher_id)
VALUES (gen_random_uuid(), '$env_id', gen_random_uuid(), gen_random_uuid(), ':ev', gen_random_uuid());
COMMIT;
SQL
    pgbench -h 127.0.0.1 -U postgres -n -c "$3" -j 2 -T 20 -f target/pgbench-partitions.sql $db 2>&1 |
      sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | cut -d. -f1
  }
  # Each pairing: plant, then the run alone and the run beside retention, each after a
  # checkpoint (the first change to a page after one writes the whole page to the WAL); the
  # second pairing in the other order. The old rows are in the table in the run alone too.
  alone_run() { q "CHECKPOINT"; ingest "$1" "$2" "$3"; }
  beside_run() {
    q "CHECKPOINT"
    retain "$1" > target/retain.out &
    local rpid=$! tps
    tps=$(ingest "$1" "$2" "$3")
    wait $rpid
    echo "$tps"
  }
  for layout in "event_records job_runs" "ev_part rn_part"; do
    set -- $layout
    for clients in 16 64; do
      plant "$1" "$2"
      a1=$(alone_run "$1" "$2" $clients)
      b1=$(beside_run "$1" "$2" $clients)
      r1=$(cat target/retain.out)
      plant "$1" "$2"
      b2=$(beside_run "$1" "$2" $clients)
      r2=$(cat target/retain.out)
      a2=$(alone_run "$1" "$2" $clients)
      echo "== $1, $clients clients ($(date -u +%H:%M:%S)): alone $a1; $a2 tx/s, while retention removes 1,000,000 events $b1; $b2 tx/s ($(echo "scale=1; ($b1 + $b2 - $a1 - $a2) * 100 / ($a1 + $a2)" | bc) %); retention took $r1; $r2"
    done
    plant "$1" "$2"
    q "CHECKPOINT"
    echo "== $1, retention alone: $(retain "$1")"
  done
  psql -h 127.0.0.1 -U postgres -d $db -qAtc "SELECT relname, n_live_tup, n_dead_tup FROM pg_stat_user_tables
    WHERE relname ~ '^(event_records|job_runs|ev_part|rn_part)' ORDER BY 1" | sed 's/^/  /'
  exit 0
fi
if [[ $which == console ]]; then
  # The console's page times on a database of 1,000,000 events (half of them one
  # environment's, of ten), 1,000,000 runs and 2,000,000 jobs (2 % discarded), planted by
  # SQL; `kongflow-events serve` (no relay or worker) with an operator token; then
  # benches/console_pages.py asks each page ROUNDS times (40).
  export SQLX_OFFLINE=true
  cargo build --release --locked --quiet --bin kongflow-events
  db=kongflow_console_bench
  psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
  export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db AMQP_PREFIX=kongflow-console-bench
  export HTTP_ADDR=127.0.0.1:3031 METRICS_ADDR=127.0.0.1:3032 RUST_LOG=warn
  export OPERATOR_TOKEN=console-bench-operator-token
  drop_queues "$AMQP_PREFIX"
  target/release/kongflow-events migrate >/dev/null
  for i in $(seq 0 9); do target/release/kongflow-events env create "bench/console/e$i" >/dev/null; done
  key=$(target/release/kongflow-events env create bench/console/e0 | tail -1)
  target/release/kongflow-events serve >/dev/null 2>&1 &
  pid=$!
  trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do curl -sf http://$HTTP_ADDR/readyz >/dev/null && break; sleep 0.2; done
  for j in $(seq 1 20); do
    curl -sf -X PUT "http://$HTTP_ADDR/api/v1/jobs/job-$j" -H "Authorization: Bearer $key" \
      -H 'content-type: application/json' \
      -d "{\"version\":\"1.0.0\",\"trigger\":{\"event\":\"bench.$((j % 20))\",\"payload\":{\"i\":[$j]}}}" >/dev/null
  done
  echo "== planting 1,000,000 events, 1,000,000 runs, 2,000,000 jobs ($(date -u +%H:%M:%S))"
  start=$(date +%s)
  psql -h 127.0.0.1 -U postgres -d $db -qAt -v ON_ERROR_STOP=1 <<'SQL'
CREATE TEMP TABLE envs AS
  SELECT row_number() OVER (ORDER BY e.slug) - 1 AS n, e.id FROM runtime_environments e;
-- Event i: half in e0, the rest spread over e1..e9; a second apart back from now, the
-- last thousand delayed.
INSERT INTO event_records (id, environment_id, event_id, name, payload, context, timestamp,
                           deliver_at, delivered_at, created_at, updated_at)
SELECT uuid_v7_floor(t), env.id, 'evt-' || i, 'bench.' || (i % 20),
       jsonb_build_object('i', i, 'note', 'planted'), '{}', t,
       CASE WHEN i > 999000 THEN now() + interval '1 hour' ELSE t END,
       CASE WHEN i > 999000 THEN NULL ELSE t + interval '5 ms' END, t, t
FROM generate_series(1, 1000000) AS i,
     LATERAL (SELECT now() - make_interval(secs => (1000000 - i) * 0.05) AS t) AS ts,
     LATERAL (SELECT id FROM envs WHERE n = CASE WHEN i % 2 = 0 THEN 0 ELSE 1 + i % 9 END) AS env;
INSERT INTO job_runs (id, environment_id, job_id, job_version_id, event_record_id, dispatcher_id,
                      created_at, updated_at)
SELECT gen_random_uuid(), environment_id, gen_random_uuid(), gen_random_uuid(), id,
       gen_random_uuid(), created_at, created_at
FROM event_records;
-- Two jobs an event, finished within the last day (retention keeps them), 2 % discarded.
INSERT INTO queue_jobs (kind, args, state, attempt, max_attempts, run_at, errors, created_at,
                        attempted_at, finalized_at, published_at, environment_id)
SELECT CASE WHEN k = 0 THEN 'deliverEvent' ELSE 'events.invokeDispatcher' END,
       CASE WHEN k = 0 THEN jsonb_build_object('id', e.id)
            ELSE jsonb_build_object('id', gen_random_uuid(), 'eventRecordId', e.id) END,
       (CASE WHEN (x % 50) = 0 THEN 'discarded' ELSE 'completed' END)::queue_job_state,
       CASE WHEN (x % 50) = 0 THEN 5 ELSE 1 END, 5, t,
       CASE WHEN (x % 50) = 0 THEN '[{"error": "planted failure", "attempt": 5}]'::jsonb
            ELSE '[]'::jsonb END,
       t, t + interval '2 ms', t + interval '4 ms', t + interval '1 ms', e.environment_id
FROM (SELECT e.*, row_number() OVER () AS x FROM event_records e) AS e,
     generate_series(0, 1) AS k,
     LATERAL (SELECT now() - make_interval(secs => ((1000000 - e.x) * 0.05) % 80000) AS t) AS ts;
ANALYZE;
SQL
  echo "   planted in $(($(date +%s) - start)) s"
  q() { psql -h 127.0.0.1 -U postgres -d $db -qAtc "$1"; }
  e0=$(q "SELECT id FROM runtime_environments WHERE slug = 'e0'")
  deep=$(q "SELECT floor(extract(epoch FROM timestamp) * 1000000)::bigint || '.' || id FROM event_records
            WHERE environment_id = '$e0' ORDER BY timestamp DESC, id DESC OFFSET 250000 LIMIT 1")
  export DEEP_CURSOR=$(printf '%s' "$deep" | base64 -w0 | tr '+/' '-_' | tr -d '=')
  export DEEP_JOB=$(q "SELECT id FROM queue_jobs WHERE environment_id = '$e0' ORDER BY id OFFSET 500000 LIMIT 1")
  export JOB=$(q "SELECT id FROM queue_jobs WHERE environment_id = '$e0' AND state = 'discarded' LIMIT 1")
  export EVENT=$(q "SELECT event_id FROM event_records WHERE environment_id = '$e0' AND name = 'bench.4' OFFSET 1000 LIMIT 1")
  export SINCE=$(q "SELECT to_char(now() - interval '6 hours', 'YYYY-MM-DD\"T\"HH24:MI')")
  export UNTIL=$(q "SELECT to_char(now() - interval '5 hours', 'YYYY-MM-DD\"T\"HH24:MI')")
  echo "== page times ($(date -u +%H:%M:%S))"
  BASE_URL=http://$HTTP_ADDR ENV_PATH=bench/console/e0 python3 benches/console_pages.py
  exit 0
fi
export SQLX_OFFLINE=true
cargo build --release --locked --quiet
cargo bench --locked --no-run --quiet --bench pipeline --bench delays --bench tiers --bench ingest --bench fairness 2>/dev/null
db=kongflow_bench
psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)"
psql -h 127.0.0.1 -U postgres -d postgres -qAtc "CREATE DATABASE $db"
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
export AMQP_PREFIX=kongflow-bench HTTP_ADDR=127.0.0.1:3031 RUST_LOG=${BENCH_LOG:-warn}
# Metrics are served on METRICS_ADDR, never on the API's address.
export METRICS_ADDR=127.0.0.1:3032 METRICS_URL=http://127.0.0.1:3032
# Retention looks for old events every 5 s in the retention bench (the default is a minute).
[[ $which == retention ]] && export RETENTION_INTERVAL_MS=5000
# deadrows: retention with work all through the run: the run's own jobs go 2 minutes after
# they end and its events 3 minutes after they were stored, looked for every 10 s.
if [[ $which == deadrows ]]; then
  export RETENTION_INTERVAL_MS=10s RETENTION_COMPLETED_MS=2m RETENTION_DISCARDED_MS=2m
  export RETENTION_EVENTS_MS=3m
fi
drop_queues "$AMQP_PREFIX"
target/release/kongflow-events all &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -sf http://$HTTP_ADDR/healthz >/dev/null && break; sleep 0.2; done
# retention and deadrows measure the events' tables sliced by day (docs/operations.md).
if [[ $which == retention || $which == deadrows ]]; then
  target/release/kongflow-events storage partition
fi
# Postgres alone, the same-run baseline: one event row + one outbox row per transaction,
# 16 clients, on a database of its own with the same schema, which no relay reads.
pgbench_baseline() {
  echo "== postgres alone: one event row + one outbox row per transaction, 16 clients (pgbench)"
  base=kongflow_bench_pgbench
  psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $base WITH (FORCE)"
  psql -h 127.0.0.1 -U postgres -d postgres -qAtc "CREATE DATABASE $base"
  base_url=postgres://postgres@127.0.0.1:5432/$base
  env_id=$(DATABASE_URL=$base_url target/release/kongflow-events env create bench/pgbench/base \
    | sed -n 's/.* id \([0-9a-f-]*\)$/\1/p')
  cat > target/pgbench-ingest.sql <<SQL
BEGIN;
INSERT INTO event_records (id, environment_id, event_id, name, payload)
VALUES ((lpad(to_hex(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0') || '7'
         || substr(md5(random()::text), 1, 3) || '8' || substr(md5(random()::text), 1, 15))::uuid,
        '$env_id', gen_random_uuid()::text, 'bench.event', '{"kind": "bench"}');
INSERT INTO queue_jobs (kind, args, state) VALUES ('deliverEvent', '{"id": 1}', 'available');
COMMIT;
SQL
  pgbench -h 127.0.0.1 -U postgres -n -c 16 -j 2 -T 15 -f target/pgbench-ingest.sql "$base" \
    | grep -E "latency average|tps"
  psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE $base WITH (FORCE)"
}
if [[ $which == all || $which == pipeline ]]; then
  pgbench_baseline
  for clients in 16 64; do
    echo "== flat out, $clients connections"
    cargo bench --locked --quiet --bench pipeline -- --url http://$HTTP_ADDR --events 20000 --concurrency $clients "$@"
  done
  for rate in 300 500 2000; do
    echo "== offered $rate events/s"
    cargo bench --locked --quiet --bench pipeline -- --url http://$HTTP_ADDR --events $((rate * 20)) --rate $rate --concurrency 64 "$@"
  done
fi
if [[ $which == all || $which == delays ]]; then
  echo "== delayed: 10,000 events due 1-60 s ahead, 200 immediate events/s alongside"
  cargo bench --locked --quiet --bench delays -- --url http://$HTTP_ADDR --events 10000 --rate 200 "$@"
fi
if [[ $which == all || $which == tiers ]]; then
  echo "== the delay tiers alone"
  cargo bench --locked --quiet --bench tiers -- "$@"
fi
if [[ $which == all || $which == ingest ]]; then
  pgbench_baseline
  for publishers in 16 4; do
    echo "== amqp ingest flat out, $publishers publishers"
    cargo bench --locked --quiet --bench ingest -- --url http://$HTTP_ADDR --events 50000 --concurrency $publishers "$@"
  done
  echo "== amqp ingest, offered 500 events/s"
  cargo bench --locked --quiet --bench ingest -- --url http://$HTTP_ADDR --events 10000 --rate 500 --concurrency 4 "$@"
fi
if [[ $which == all || $which == fairness ]]; then
  [[ $which == fairness ]] && pgbench_baseline
  echo "== fairness: a flood of 20,000 beside ten quiet environments, with shares"
  cargo bench --locked --quiet --bench fairness -- --url http://$HTTP_ADDR "$@"
  echo "== the same with A's ingest held to 1,000 events/s (about what the workers take)"
  cargo bench --locked --quiet --bench fairness -- --url http://$HTTP_ADDR --rate-of-a 1000 "$@"
  echo "== the same without shares (max_jobs_in_flight lifted)"
  cargo bench --locked --quiet --bench fairness -- --url http://$HTTP_ADDR --unfair "$@"
fi
plant_old() { # 1,000,000 delivered events of 40 days ago, a run each, in the bench's environment
  # Their ids are UUIDv7 of their time (as the service makes them), in the slice of their
  # day, which is made first (on sliced tables).
  # The events and their keys in one transaction, as a send stores an event with its key:
  # a retention pass between the two would drop the slice and leave the keys behind. The
  # slices before it (a transaction holding new slices' locks stalls the relay's deletes of
  # dispatchers, which cascade into webhook_attempts).
  PGOPTIONS="-c bench.plant_keys=${PLANT_KEYS:-1}" psql -h 127.0.0.1 -U postgres -d "$db" -qAt <<'SQL'
DO $$ BEGIN
  IF to_regproc('event_slices_ensure') IS NOT NULL THEN
    PERFORM event_slices_ensure((now() - interval '41 days')::date, (now() - interval '39 days')::date);
  END IF;
END $$;
BEGIN;
INSERT INTO event_records (id, environment_id, event_id, name, payload, created_at, deliver_at, delivered_at)
SELECT uuid_v7_floor(t), (SELECT id FROM runtime_environments ORDER BY created_at LIMIT 1),
       'old-' || g, 'bench.old', '{"kind": "old"}', t, t, t
FROM generate_series(1, 1000000) g,
     LATERAL (SELECT now() - interval '40 days' + g * interval '1 ms') AS ts(t);
INSERT INTO job_runs (id, environment_id, job_id, job_version_id, event_record_id, dispatcher_id, created_at)
SELECT gen_random_uuid(), e.environment_id, gen_random_uuid(), gen_random_uuid(), e.id, gen_random_uuid(), e.created_at
FROM event_records e WHERE e.name = 'bench.old';
-- Their keys, as sends on sliced tables store them (retention forgets them after the
-- slice); none with PLANT_KEYS=0, which leaves retention only the slice to drop.
DO $$ BEGIN
  IF to_regclass('event_keys') IS NOT NULL AND current_setting('bench.plant_keys') = '1'
     AND EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'event_records'::regclass) THEN
    INSERT INTO event_keys (environment_id, event_id, record_id)
    SELECT environment_id, event_id, id FROM event_records WHERE name = 'bench.old';
  END IF;
END $$;
COMMIT;
ANALYZE event_records; ANALYZE job_runs; ANALYZE event_keys;
-- The plant's dirty pages written now, not by the checkpoint that would fall in the run.
CHECKPOINT;
SQL
}
if [[ $which == deadrows ]]; then
  # Dead rows over a long paced run with retention at work (MINUTES, default 10, at RATE,
  # default 300 events/s): 1,000,000 old events and their runs planted first (retention's
  # first passes delete them), then the run's own jobs and events deleted as they age
  # (above). pg_stat_user_tables' live and dead rows of every table that has either, at
  # the start, every 2 minutes and at the end. On this machine autovacuum is off
  # (conf.d/90-ci.conf): what vacuums is the relay's vacuum pass (VACUUM_INTERVAL_MS).
  minutes=${1:-10} rate=${2:-300}
  table_rows() {
    echo "  -- $1 ($(date -u +%H:%M:%S)): table live dead"
    psql -h 127.0.0.1 -U postgres -d "$db" -qAt -F ' ' -c "SELECT relname, n_live_tup, n_dead_tup
      FROM pg_stat_user_tables WHERE n_live_tup + n_dead_tup > 0 ORDER BY relname" | sed 's/^/     /'
  }
  cargo bench --locked --quiet --bench pipeline -- --url http://$HTTP_ADDR --events 400 --rate 200 --concurrency 16 >/dev/null
  echo "== planting 1,000,000 old settled events"
  plant_old
  table_rows "start"
  echo "== $minutes minutes at $rate events/s"
  # The client's own end-to-end figures are not read: retention deletes the run's events
  # (and runs) it would count. Its sends stop at the last snapshot.
  client=$(client_of target)
  "$client" --url http://$HTTP_ADDR --events $((rate * minutes * 60)) --rate "$rate" \
    --concurrency 16 >/dev/null 2>&1 &
  run=$!
  for m in $(seq 2 2 "$minutes"); do
    sleep 120
    table_rows "minute $m"
  done
  kill $run 2>/dev/null || true
  sent=$(psql -h 127.0.0.1 -U postgres -d "$db" -qAtc "SELECT count(*) FROM queue_jobs
    WHERE kind = 'deliverEvent' AND created_at > now() - make_interval(mins => $minutes)")
  echo "  deliverEvent jobs of the run still kept: $sent (completed ones go after 2 minutes)"
  exit 0
fi
if [[ $which == retention ]]; then
  pgbench_baseline
  deleted() { # deleted WHAT: retention's count of what it removed (events, keys)
    curl -sf $METRICS_URL/metrics | awk -v w="$1" '$1 == "kongflow_retention_deleted_total{what=\"" w "\"}" {print int($2)}' | grep . || echo 0
  }
  # Retention is held off while the old events are planted (the bench takes retention's
  # advisory lock, events::retention::EVENTS_RETENTION_LOCK, in a session of its own) and
  # let go as the run starts, so what it removes goes during the run, however quick it is.
  # The holding session stays idle after taking the lock: a statement running all along
  # (a pg_sleep) would hold back the xmin horizon, so no dead row could be pruned during
  # the run and ingest would run at half its rate.
  hold_retention() {
    coproc HOLDER { psql -h 127.0.0.1 -U postgres -d "$db" -qAt >/dev/null 2>&1; }
    HOLD=$HOLDER_PID
    echo "SELECT pg_advisory_lock(7738984569082573934);" >&"${HOLDER[1]}"
    until [[ $(psql -h 127.0.0.1 -U postgres -d "$db" -qAtc "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objid = 1919251566 AND classid = 1801872758") == 1 ]]; do sleep 0.2; done
  }
  let_go() { # end the session holding retention's lock, then its client (its input closed)
    psql -h 127.0.0.1 -U postgres -d "$db" -qAtc "SELECT pg_terminate_backend(pid) FROM pg_locks
      WHERE locktype = 'advisory' AND objid = 1919251566 AND classid = 1801872758" >/dev/null
    exec {HOLDER[1]}>&-
    wait $HOLD 2>/dev/null || true
  }
  run() { # run CLIENTS: the pipeline bench; its output on stderr, its ingest rate on stdout
    # Every run starts after a checkpoint, as a run after a plant does: the full-page
    # images the first writes after one cost, each run pays alike.
    psql -h 127.0.0.1 -U postgres -d "$db" -qAtc "CHECKPOINT"
    cargo bench --locked --quiet --bench pipeline -- --url http://$HTTP_ADDR --events "${RETENTION_EVENTS:-80000}" --concurrency $1 "${@:2}" > target/retention-run.txt
    cat target/retention-run.txt >&2
    awk '/^ingest:/ {print $2}' target/retention-run.txt
  }
  # Two pairings a connection count, the second in the other order. Each run follows a
  # plant of 1,000,000 old events (its writes, its checkpoint and what it leaves in the
  # caches alike): "alone" runs with retention still held off, "beside" with it let go as
  # the run starts; after either, retention removes them and forgets their keys before
  # the next plant.
  # Retention forgets a slice's keys paced over its next passes (a twentieth of a core):
  # once the old events are gone, the bench forgets what is left of them flat out, as
  # `slices::forget_gone_keys` would, so no run meets the last run's keys.
  settle() {
    for _ in $(seq 1 150); do
      left=$(psql -h 127.0.0.1 -U postgres -d "$db" -qAtc "SELECT count(*) FROM event_records WHERE name = 'bench.old'")
      [[ $left == 0 ]] && break
      sleep 2
    done
    forgot=$(psql -h 127.0.0.1 -U postgres -d "$db" -qAt <<'SQL'
WITH ranges AS (SELECT lower, upper FROM event_keys_gone),
     forgot AS (SELECT event_keys_forget(lower, upper, 2147483647) AS n FROM ranges)
SELECT COALESCE(sum(n), 0) FROM forgot;
DELETE FROM event_keys_gone g WHERE NOT EXISTS (
    SELECT 1 FROM event_keys k WHERE k.record_id >= g.lower AND k.record_id < g.upper);
SQL
)
    echo "old events left: $left; keys the bench forgot after retention: $forgot ($(date -u +%H:%M:%S))"
  }
  # RETENTION_PAIRINGS pairings a connection count (default 2), each in the other order
  # than the one before.
  steps=()
  for i in $(seq 1 "${RETENTION_PAIRINGS:-2}"); do
    if (( i % 2 )); then steps+=(alone beside); else steps+=(beside alone); fi
  done
  for clients in ${RETENTION_CLIENTS:-16 64}; do
    alone=() beside=()
    # A warm-up at each connection count (the first run at a count is the slowest, by 10-30 %
    # on 2026-12-07, whichever it is), then a checkpoint, as after each plant.
    RETENTION_EVENTS=20000 run $clients "$@" >/dev/null 2>&1
    psql -h 127.0.0.1 -U postgres -d "$db" -qAtc "CHECKPOINT"
    for step in "${steps[@]}"; do
      echo "== planting 1,000,000 old settled events (retention held off)"
      hold_retention
      plant_old
      if [[ $step == alone ]]; then
        echo "== $clients connections, retention held off ($(date -u +%H:%M:%S))"
        alone+=($(run $clients "$@"))
        let_go
      else
        events0=$(deleted events) keys0=$(deleted keys)
        let_go
        echo "== $clients connections, retention removing them beside it ($(date -u +%H:%M:%S))"
        beside+=($(run $clients "$@"))
        # What it left of the keys, settle (below) forgets and counts.
        echo "retention removed $(($(deleted events) - events0)) events and forgot $(($(deleted keys) - keys0)) keys during the run ($(date -u +%H:%M:%S))"
      fi
      # Then until they are gone and their keys forgotten (paced, after their slice), so
      # the next plant starts from the same state.
      settle
    done
    sum() { local t=0; for v in "$@"; do t=$((t + v)); done; echo $t; }
    pairings=()
    for i in "${!alone[@]}"; do
      pairings+=("$(echo "scale=1; (${beside[$i]} - ${alone[$i]}) * 100 / ${alone[$i]}" | bc) %")
    done
    echo "== $clients connections: ingest alone ${alone[*]} events/s, beside retention ${beside[*]} events/s" \
      "($(echo "scale=1; ($(sum "${beside[@]}") - $(sum "${alone[@]}")) * 100 / $(sum "${alone[@]}")" | bc) %; pairings: ${pairings[*]})"
  done
fi
