#!/usr/bin/env bash
# The whole integration suite in quorum mode (TEST_QUEUE_TYPE=quorum) on a one-node broker
# of its own (kfc4@localhost on 5684, started by scripts/cluster.sh with the file limit
# quorum queues need), removed after, whatever the outcome. The machine's broker on 5672
# stays as it is; the tests that work the broker with rabbitmqctl reach the suite's node
# through RABBITMQ_NODENAME.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
trap 'scripts/cluster.sh solo down' EXIT
scripts/cluster.sh solo up
export AMQP_URL="amqp://guest:guest@127.0.0.1:5684/%2f" RABBITMQ_NODENAME=kfc4@localhost
export TEST_QUEUE_TYPE=quorum SQLX_OFFLINE=true
unset DATABASE_URL
cargo test --locked --test it
