#!/usr/bin/env bash
# A three-node RabbitMQ cluster beside the machine's own broker (which stays on 5672,
# untouched): nodes kfc1@localhost, kfc2@localhost and kfc3@localhost on AMQP ports 5681,
# 5682 and 5683 (distribution ports 25681-25683), their files under target/cluster/.
#
#   scripts/cluster.sh up        start the three nodes and join them into one cluster
#   scripts/cluster.sh down      stop them and remove their files
#   scripts/cluster.sh stop N    stop node N (1-3), as a node lost
#   scripts/cluster.sh start N   start node N again (it rejoins the cluster by itself)
#   scripts/cluster.sh leader Q  the node (1-3) that leads quorum queue Q
#   scripts/cluster.sh urls      the AMQP_URL that lists the three nodes
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(pwd)/target/cluster
name() { echo "kfc$1@localhost"; }
port() { echo $((5680 + $1)); }

start_node() {
  local n=$1 dir=$base/kfc$1
  mkdir -p "$dir/mnesia" "$dir/log"
  # guest may connect from loopback only by default; these nodes listen on loopback anyway.
  printf 'loopback_users = none\nlisteners.tcp.1 = 127.0.0.1:%s\n' "$(port "$n")" >"$dir/rabbitmq.conf"
  echo '[].' >"$dir/enabled_plugins"
  # The settings the project ships for quorum mode (the dead-letter hop's confirm timeout).
  cp rabbitmq/advanced.config "$dir/advanced.config"
  # Debian's wrapper runs the node as the rabbitmq user: its files must be that user's.
  chown -R rabbitmq:rabbitmq "$dir"
  env RABBITMQ_NODENAME="$(name "$n")" RABBITMQ_NODE_PORT="$(port "$n")" \
    RABBITMQ_DIST_PORT=$((25680 + n)) RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    rabbitmq-server -detached
}

wait_node() {
  local n=$1
  for _ in $(seq 1 120); do
    rabbitmqctl -q -n "$(name "$n")" await_startup --timeout 5 >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "node $(name "$n") did not start; its log: $base/kfc$n/log" >&2
  exit 1
}

stop_node() {
  rabbitmqctl -q -n "$(name "$1")" stop >/dev/null 2>&1 || true
}

case "${1:-}" in
up)
  for n in 1 2 3; do stop_node "$n"; done
  # The nodes' logs stay, in target/cluster-logs, for a failed run to be read.
  rm -rf "$base-logs"/kfc[123] && mkdir -p "$base-logs"
  for n in 1 2 3; do [ -d "$base/kfc$n/log" ] && cp -r "$base/kfc$n/log" "$base-logs/kfc$n"; done
  rm -rf "$base"
  for n in 1 2 3; do start_node "$n"; done
  for n in 1 2 3; do wait_node "$n"; done
  for n in 2 3; do
    rabbitmqctl -q -n "$(name "$n")" stop_app
    rabbitmqctl -q -n "$(name "$n")" join_cluster "$(name 1)"
    rabbitmqctl -q -n "$(name "$n")" start_app
  done
  running=$(rabbitmqctl -q -n "$(name 1)" eval 'length(rabbit_nodes:all_running()).')
  if [ "$running" != 3 ]; then
    echo "the cluster has $running running nodes, not 3" >&2
    exit 1
  fi
  ;;
down)
  for n in 1 2 3; do stop_node "$n"; done
  # The nodes' logs stay, in target/cluster-logs, for a failed run to be read.
  rm -rf "$base-logs"/kfc[123] && mkdir -p "$base-logs"
  for n in 1 2 3; do [ -d "$base/kfc$n/log" ] && cp -r "$base/kfc$n/log" "$base-logs/kfc$n"; done
  rm -rf "$base"
  ;;
stop) stop_node "$2" ;;
start)
  start_node "$2"
  wait_node "$2"
  ;;
leader)
  # Asked of each running node in turn, for up to 20 s: a queue just declared may not have
  # elected its leader yet, and a node being stopped answers with an error.
  for _ in $(seq 1 20); do
    for n in 1 2 3; do
      if out=$(rabbitmqctl -q -n "$(name "$n")" list_queues name leader --no-table-headers 2>&1); then
        node=$(awk -v q="$2" '$1 == q { print $2 }' <<<"$out")
        case "$node" in
        kfc[123]@localhost)
          echo "${node:3:1}"
          exit 0
          ;;
        esac
      else
        last_error=$out
      fi
    done
    sleep 1
  done
  echo "no leader found for queue $2${last_error:+ (last error: $last_error)}" >&2
  exit 1
  ;;
urls)
  echo "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f"
  ;;
*)
  sed -n '2,12p' "$0" >&2
  exit 2
  ;;
esac
