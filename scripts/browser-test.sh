#!/usr/bin/env bash
# The operator console in a real browser: Debian's Chromium and ChromeDriver (installed when
# missing), driven by Selenium (in target/browser-venv) through tests/browser/console_test.py,
# against `kongflow-events all` (the debug build) on a database and a RabbitMQ prefix of its
# own, with an operator token and a webhook target on loopback. Screenshots of every page go
# to target/console-screenshots (`SCREENSHOTS=docs/console` refreshes the documentation's).
# Everything it made is removed after, whatever the outcome.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
venv=target/browser-venv
if ! "$venv/bin/python" -c 'import selenium' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "selenium>=4.20,<5"
fi
export SQLX_OFFLINE=true
unset DATABASE_URL
cargo build --locked --quiet --bin kongflow-events

db=kf_browser_$$
port=$((20000 + $$ % 20000))
prefix=kf-browser-$$
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db AMQP_PREFIX=$prefix
export HTTP_ADDR=127.0.0.1:$port METRICS_ADDR=127.0.0.1:$((port + 1)) RUST_LOG=warn
export OPERATOR_TOKEN=browser-test-operator-token-$$
# Webhook targets on loopback (the test's own server), retries quick, so a failing webhook
# is dead-lettered within seconds.
export WEBHOOK_ALLOW_NETS=127.0.0.0/8 RETRY_BASE_MS=100ms
pid=
down() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  psql -h 127.0.0.1 -U postgres -d postgres -qAtc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1
  rabbitmqctl -q eval "P = <<\"$prefix.\">>, lists:foreach(fun(Q) ->
      {resource, _, queue, N} = amqqueue:get_name(Q),
      case binary:match(N, P) of {0, _} -> rabbit_amqqueue:delete(Q, false, false, <<\"test\">>); _ -> ok end
    end, rabbit_amqqueue:list()), ok." >/dev/null 2>&1 || true
}
trap down EXIT
psql -h 127.0.0.1 -U postgres -d postgres -qAtc "CREATE DATABASE $db" >/dev/null
target/debug/kongflow-events migrate >/dev/null
# `env create` prints the new API key last.
key=$(target/debug/kongflow-events env create browser/console/dev | tail -1)
target/debug/kongflow-events env create browser/other/prod >/dev/null
target/debug/kongflow-events all >target/browser-test.log 2>&1 &
pid=$!
for _ in $(seq 1 100); do curl -sf "http://$HTTP_ADDR/readyz" >/dev/null && break; sleep 0.2; done
BASE_URL=http://$HTTP_ADDR API_KEY=$key ENV_PATH=browser/console/dev \
  SCREENSHOTS=${SCREENSHOTS:-target/console-screenshots} \
  "$venv/bin/python" tests/browser/console_test.py
