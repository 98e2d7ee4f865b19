#!/usr/bin/env bash
# The stores over TLS: a certificate authority made for the run (and a second one that
# signed nothing here), a Postgres of its own (the machine's binaries, ssl = on, plain
# connections refused by pg_hba) on 127.0.0.1:5441, and a RabbitMQ node that speaks only
# amqps on 5685 (scripts/cluster.sh tls). Then tests/it/tls.rs (verify-full and amqps
# with the CA, and what a process says when it cannot trust the server) and the pipeline
# and chart tests of the suite, all on those two servers. Everything is removed after,
# whatever the outcome.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
dir=$PWD/target/tls
pg_port=5441
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

down() {
  scripts/cluster.sh tls down || true
  [ -f "$dir/pg/data/postmaster.pid" ] &&
    runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/pg/data" -m immediate stop >/dev/null 2>&1
  rm -rf "$dir"
}
trap down EXIT
down

# The authority, the servers' certificate (for localhost and 127.0.0.1), and another
# authority that signed nothing the servers show.
mkdir -p "$dir"
(
  cd "$dir"
  ca() { # ca <name> <common name>
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
      -keyout "$1.key" -out "$1.crt" -subj "/CN=$2" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
  }
  ca ca "kongflow test CA"
  ca other-ca "kongflow unrelated CA"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout server.key \
    -out server.csr -subj "/CN=localhost" 2>/dev/null
  printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'basicConstraints=critical,CA:FALSE' \
    'keyUsage=critical,digitalSignature,keyEncipherment' 'extendedKeyUsage=serverAuth' >server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
    -extfile server.ext -out server.crt 2>/dev/null
  chmod 644 ./*.crt server.key
)

# Postgres: TLS or nothing over TCP.
mkdir -p "$dir/pg"
chown postgres:postgres "$dir/pg"
runuser -u postgres -- "$pg_bin/initdb" -D "$dir/pg/data" -A trust -U postgres >/dev/null
install -o postgres -m 600 "$dir/server.key" "$dir/pg/data/server.key"
install -o postgres -m 644 "$dir/server.crt" "$dir/pg/data/server.crt"
cat >>"$dir/pg/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$dir/pg'
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
max_connections = 300
fsync = off
EOF
printf '%s\n' 'local all all trust' 'hostssl all all 127.0.0.1/32 trust' \
  'hostnossl all all 0.0.0.0/0 reject' >"$dir/pg/data/pg_hba.conf"
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/log" -w start >/dev/null

# RabbitMQ: amqps only.
scripts/cluster.sh tls up

# Every connection of the suite goes through TLS, verified against the run's authority:
# Postgres by sslmode=verify-full (libpq's variables, which the service reads as libpq
# does), RabbitMQ by amqps with AMQP_TLS_CA_FILE.
export TEST_PG_BASE="postgres://postgres@localhost:$pg_port" PGSSLMODE=verify-full \
  PGSSLROOTCERT=$dir/ca.crt AMQP_URL="amqps://guest:guest@localhost:5685/%2f" \
  AMQP_TLS_CA_FILE=$dir/ca.crt RABBITMQ_NODENAME=kfc5@localhost \
  KONGFLOW_TLS_DIR=$dir SQLX_OFFLINE=true
unset DATABASE_URL
timeout 900 cargo test --locked --test it -- --include-ignored tls:: pipeline:: \
  deploy::the_processes_the_chart_renders_run_and_deliver_an_event
