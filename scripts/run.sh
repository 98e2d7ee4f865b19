#!/usr/bin/env bash
# Run the service (`kongflow-events all`: HTTP API, AMQP ingest, relay and worker) on the
# local Postgres and RabbitMQ, starting or installing them when missing. Prints an API key
# for a development environment (the same key on every run, kept in target/dev-api-key)
# and how to send a first event.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/kongflow}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export HTTP_ADDR=${HTTP_ADDR:-127.0.0.1:3030}
export METRICS_ADDR=${METRICS_ADDR:-127.0.0.1:9464}
export AMQP_PREFIX=${AMQP_PREFIX:-kongflow}

# The ports first, before anything is built, created or changed.
port_taken() { # host:port
  local host=${1%:*} port=${1##*:}
  [ "$port" != 0 ] && (exec 3<>"/dev/tcp/${host/0.0.0.0/127.0.0.1}/$port") 2>/dev/null
}
for var in HTTP_ADDR METRICS_ADDR; do
  if port_taken "${!var}"; then
    echo "run.sh: ${!var} is already in use (another kongflow-events?). Stop what listens" \
      "there, or pick another address: $var=127.0.0.1:<port> ./scripts/run.sh" >&2
    exit 1
  fi
done

./scripts/services.sh
# RabbitMQ names: every exchange and queue starts with AMQP_PREFIX. A prefix belongs to one
# database: a service of another database refuses to start on it.
echo "RabbitMQ: this service's exchanges and queues are named $AMQP_PREFIX.*" \
  "(another prefix: AMQP_PREFIX=<name> ./scripts/run.sh)"
if names=$(rabbitmqctl -q list_queues name 2>/dev/null); then
  n=$(grep -c "^$AMQP_PREFIX\." <<<"$names" || true)
  [ "$n" = 0 ] || echo "  $n queues on this broker already have that prefix: an earlier run's, or" \
    "another installation's, which this one then shares (a service of another database refuses to start on it)"
fi

db=${DATABASE_URL##*/}
psql -h 127.0.0.1 -U postgres -d postgres -qAtc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qAtc "CREATE DATABASE \"$db\""

export SQLX_OFFLINE=true
bin=target/release/kongflow-events
if [ ! -x "$bin" ]; then
  echo "building (first build takes ~10 minutes; later ones seconds)"
fi
cargo build --release --locked
$bin migrate
$bin topology

# The development key: the saved one while the database still knows it, else a new one.
key_file=target/dev-api-key
key=""
if [ -s "$key_file" ]; then
  key=$(cat "$key_file")
  known=$(psql "$DATABASE_URL" -qAtc \
    "SELECT count(*) FROM runtime_environments WHERE api_key_hash = sha256(convert_to('$key', 'UTF8'))" \
    2>/dev/null || echo 0)
  [ "$known" = 1 ] || key=""
fi
if [ -z "$key" ]; then
  key=$($bin env create local/kongflow/dev | tail -n 1)
  (umask 077 && printf '%s\n' "$key" >"$key_file")
  echo "new API key for local/kongflow/dev saved in $key_file"
fi
cat <<MSG

API key for local/kongflow/dev: $key

The other commands (jobs, env, migrate, topology, a second worker) talk to the same
database and broker once these are set in their terminal:

  export DATABASE_URL='$DATABASE_URL'
  export AMQP_URL='$AMQP_URL'
  export AMQP_PREFIX='$AMQP_PREFIX'
  alias kongflow-events=$PWD/$bin

Register a job, send an event, and look at its runs:

  curl -s -X PUT http://$HTTP_ADDR/api/v1/jobs/welcome-email -H "Authorization: Bearer $key" \\
    -H 'content-type: application/json' \\
    -d '{"version":"1.0.0","trigger":{"event":"user.created","payload":{"plan":["pro"]}}}'
  curl -s -X POST http://$HTTP_ADDR/api/v1/events -H "Authorization: Bearer $key" \\
    -H 'content-type: application/json' \\
    -d '{"event":{"name":"user.created","id":"evt-1","payload":{"plan":"pro"}}}'
  curl -s http://$HTTP_ADDR/api/v2/events/evt-1 -H "Authorization: Bearer $key"

MSG
exec $bin all
