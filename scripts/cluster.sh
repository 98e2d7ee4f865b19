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
#   scripts/cluster.sh solo up|down  a fourth node, kfc4@localhost on 5684, alone (not
#                                 clustered): the one-node broker of the quorum suite
#   scripts/cluster.sh tls up|down   a fifth node, kfc5@localhost, alone, that speaks only
#                                 TLS (amqps) on 5685, with the certificate and key in
#                                 target/tls/ (server.crt, server.key; scripts/tls-test.sh)
#
# Each node may open as many files as the hard limit allows: Debian's wrapper starts a
# node through su, which leaves it 1024, and quorum queues (a Raft log each) exhaust that
# within a test suite, after which the node accepts TCP connections and never answers them.
set -euo pipefail
cd "$(dirname "$0")/.."
base=$(pwd)/target/cluster
name() { echo "kfc$1@localhost"; }
port() { echo $((5680 + $1)); }

start_node() {
  local n=$1 dir=$base/kfc$1
  mkdir -p "$dir/mnesia" "$dir/log"
  # guest may connect from loopback only by default; these nodes listen on loopback anyway.
  if [ "$n" = 5 ]; then
    # TLS only: no plain listener, the server's certificate from target/tls/.
    cp target/tls/server.crt target/tls/server.key target/tls/ca.crt "$dir/"
    printf '%s\n' 'loopback_users = none' 'listeners.tcp = none' \
      "listeners.ssl.1 = 127.0.0.1:$(port "$n")" "ssl_options.cacertfile = $dir/ca.crt" \
      "ssl_options.certfile = $dir/server.crt" "ssl_options.keyfile = $dir/server.key" \
      'ssl_options.verify = verify_none' 'ssl_options.fail_if_no_peer_cert = false' >"$dir/rabbitmq.conf"
  else
    printf 'loopback_users = none\nlisteners.tcp.1 = 127.0.0.1:%s\n' "$(port "$n")" >"$dir/rabbitmq.conf"
  fi
  # The largest message the shipped configuration lets in.
  grep '^max_message_size' rabbitmq/rabbitmq.conf >>"$dir/rabbitmq.conf"
  echo '[].' >"$dir/enabled_plugins"
  # The settings the project ships for quorum mode (the dead-letter hop's confirm timeout).
  cp rabbitmq/advanced.config "$dir/advanced.config"
  # Debian's wrapper runs the node as the rabbitmq user: its files must be that user's.
  chown -R rabbitmq:rabbitmq "$dir"
  export RABBITMQ_NODENAME="$(name "$n")" RABBITMQ_NODE_PORT="$(port "$n")" \
    RABBITMQ_DIST_PORT=$((25680 + n)) RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_PID_FILE="$dir/pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
  (cd /var/lib/rabbitmq && su rabbitmq -s /bin/sh -c \
    'ulimit -n "$(ulimit -Hn)"; exec /usr/lib/rabbitmq/bin/rabbitmq-server -detached')
}

# Keep node N's log in target/cluster-logs (for a failed run to be read), then remove its files.
remove_node() {
  rm -rf "$base-logs/kfc$1" && mkdir -p "$base-logs"
  [ -d "$base/kfc$1/log" ] && cp -r "$base/kfc$1/log" "$base-logs/kfc$1"
  rm -rf "$base/kfc$1"
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
  for n in 1 2 3; do stop_node "$n" && remove_node "$n"; done
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
  for n in 1 2 3; do stop_node "$n" && remove_node "$n"; done
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
solo)
  case "${2:-}" in
  up)
    stop_node 4 && remove_node 4
    start_node 4
    wait_node 4
    ;;
  down) stop_node 4 && remove_node 4 ;;
  *)
    echo "usage: scripts/cluster.sh solo up|down" >&2
    exit 2
    ;;
  esac
  ;;
tls)
  case "${2:-}" in
  up)
    stop_node 5 && remove_node 5
    start_node 5
    wait_node 5
    ;;
  down) stop_node 5 && remove_node 5 ;;
  *)
    echo "usage: scripts/cluster.sh tls up|down" >&2
    exit 2
    ;;
  esac
  ;;
urls)
  echo "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f"
  ;;
*)
  sed -n '2,20p' "$0" >&2
  exit 2
  ;;
esac
