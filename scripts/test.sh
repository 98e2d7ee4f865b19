#!/usr/bin/env bash
# The whole test suite: unit tests, and integration tests against the real Postgres and
# RabbitMQ (started, or installed, when missing). Each test makes its own database and its
# own RabbitMQ name prefix, so tests run in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
# promtool (Debian's prometheus package) validates the alert rules.
if ! command -v promtool >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
# trigger.dev's v2 SDK, for the test that drives the API with it.
if ! command -v npm >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
npm ci --prefix tests/sdk --no-audit --no-fund --loglevel=error
# schemathesis fuzzes the HTTP API from its OpenAPI document.
if ! command -v schemathesis >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check "schemathesis>=4,<5"
fi
# The Helm SDK (Helm's own library), kubernetes-validate and PyYAML render and check the
# chart without a helm binary or a cluster (scripts/chart.py).
if ! target/chart-venv/bin/python -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null; then
  python3 -m venv target/chart-venv
  target/chart-venv/bin/pip install --quiet --disable-pip-version-check \
    "helm-python-sdk>=0.2,<0.3" "kubernetes-validate>=1.33" pyyaml
fi
# The AMQP producer examples (examples/) run in the tests: pika and the CloudEvents SDK in
# a venv of their own, amqplib from the lock file. jsonschema checks the contract's schemas.
if ! target/examples-venv/bin/python -c 'import pika, cloudevents, jsonschema' 2>/dev/null; then
  python3 -m venv target/examples-venv
  target/examples-venv/bin/pip install --quiet --disable-pip-version-check \
    -r examples/python/requirements.txt
fi
npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
# Databases left by interrupted runs.
for db in $(psql -h 127.0.0.1 -U postgres -d postgres -qAtc "SELECT datname FROM pg_database WHERE datname LIKE 'kf\_test\_%'"); do
  psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
done
# Build from the committed .sqlx/ query data, never from a live database.
export SQLX_OFFLINE=true
unset DATABASE_URL
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
# The whole suite again in quorum mode, on a one-node broker of its own; about 5.5 minutes.
./scripts/quorum-test.sh
# The three-node cluster test (quorum queues, a node lost mid-traffic): its own cluster
# beside the machine's broker, removed after; about 3 minutes.
./scripts/cluster-test.sh
