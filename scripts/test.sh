#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and integration tests against the real
# Postgres and RabbitMQ (started, or installed, when missing), the suite again on quorum
# queues, the three-node cluster test, the stores over TLS, the container image built and
# run as the Helm chart runs it, an older build beside this one on its schema, and the
# operator console in a real browser. Each
# test makes its own database (a copy of a
# migrated template) and its own RabbitMQ name prefix, and removes them when it ends, so
# tests run in parallel, beside another run or a running service.
#
# Every phase runs even when an earlier one failed; the end is a table of the phases, their
# results and times, and the exit status is non-zero if any phase failed.
set -eEuo pipefail
cd "$(dirname "$0")/.."

# What the phases need. Without it nothing can run: stop at the first failure.
trap 'echo "test.sh: setting up the services and tools failed; no phase ran" >&2' ERR
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
# Python tools each in a venv of their own under target/, nothing installed machine-wide.
venv() { # venv <name> <import check> <pip arguments...>
  local dir=target/$1 check=$2
  shift 2
  if ! "$dir/bin/python" -c "$check" 2>/dev/null; then
    python3 -m venv "$dir"
    "$dir/bin/pip" install --quiet --disable-pip-version-check "$@"
  fi
}
# schemathesis fuzzes the HTTP API from its OpenAPI document.
venv schemathesis-venv 'import schemathesis' "schemathesis>=4,<5"
# The Helm SDK (Helm's own library), kubernetes-validate and PyYAML render and check the
# chart without a helm binary or a cluster (scripts/chart.py).
venv chart-venv 'import helm_python, kubernetes_validate, yaml' \
  "helm-python-sdk>=0.2,<0.3" "kubernetes-validate>=1.33" pyyaml
# The AMQP producer examples (examples/) run in the tests: pika and the CloudEvents SDK,
# amqplib from the lock file. jsonschema checks the contract's schemas.
venv examples-venv 'import pika, cloudevents, jsonschema' -r examples/python/requirements.txt
npm ci --prefix examples/node --no-audit --no-fund --loglevel=error
# Test databases left by interrupted runs: a test database is named kf_test_<unix
# seconds>_<random> and removed by its test when it ends, so only those over 6 hours old
# are left-overs; younger ones may belong to a run going on beside this one.
psql -h 127.0.0.1 -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 -c "
  SELECT datname FROM pg_database
  WHERE datname ~ '^kf_test_[0-9]+_[0-9a-f]+\$'
    AND split_part(datname, '_', 3)::bigint < extract(epoch FROM now()) - 6 * 3600" |
  while read -r db; do
    echo "dropping $db, left by a run over 6 hours ago"
    psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
  done
trap - ERR
set +e

# Build from the committed .sqlx/ query data, never from a live database.
export SQLX_OFFLINE=true
unset DATABASE_URL

names=() results=() times=()
phase() { # phase <name> <command...>: run it, note its result and time, go on either way
  local name=$1 start status
  shift
  echo "=== $name: $*"
  start=$(date +%s)
  "$@"
  status=$?
  names+=("$name")
  times+=("$(($(date +%s) - start))")
  if [ "$status" -eq 0 ]; then results+=(ok); else results+=("FAILED ($status)"); fi
}

phase fmt cargo fmt --all -- --check
phase clippy cargo clippy --all-targets --locked -- -D warnings
phase tests cargo test --locked
# The whole integration suite again in quorum mode, on a one-node broker of its own.
phase quorum ./scripts/quorum-test.sh
# The three-node cluster test (quorum queues, a node lost mid-traffic): its own cluster
# beside the machine's broker, removed after.
phase cluster ./scripts/cluster-test.sh
# TLS to both stores (verify-full, amqps with a CA made for the run), on servers of its own.
phase tls ./scripts/tls-test.sh
# The image built from the Dockerfile (buildah; local bases from Debian's packages), and the
# chart's containers run in its read-only root filesystem as its user.
phase image ./scripts/image.sh test
# The build before the newest migration beside this one, on this build's schema.
phase upgrade ./scripts/upgrade-test.sh
# The operator console in Chromium (Debian's chromium and chromedriver, Selenium).
phase browser ./scripts/browser-test.sh

failed=0
echo
printf '%-8s %-12s %s\n' phase result time
for i in "${!names[@]}"; do
  t=${times[$i]}
  printf '%-8s %-12s %dm%02ds\n' "${names[$i]}" "${results[$i]}" $((t / 60)) $((t % 60))
  [ "${results[$i]}" = ok ] || failed=1
done
exit "$failed"
