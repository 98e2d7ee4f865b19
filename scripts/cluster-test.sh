#!/usr/bin/env bash
# The three-node cluster test (tests/it/cluster.rs): starts the cluster of scripts/cluster.sh
# beside the machine's own broker, runs the test on it with quorum queues, and removes the
# cluster again, whatever the outcome. At most 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
trap 'scripts/cluster.sh down' EXIT
scripts/cluster.sh up
AMQP_URL=$(scripts/cluster.sh urls)
export AMQP_URL TEST_QUEUE_TYPE=quorum SQLX_OFFLINE=true
unset DATABASE_URL
timeout 600 cargo test --locked --test it cluster:: -- --ignored --nocapture
