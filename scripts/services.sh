#!/usr/bin/env bash
# Make sure Postgres and RabbitMQ are installed and running on this machine, listening on
# 127.0.0.1:5432 (user postgres, trust auth on loopback) and 127.0.0.1:5672 (guest/guest).
# Installs them from Debian's packages when missing (and then, only then, lets loopback in
# without a password, saying so). Safe to run again.
set -euo pipefail

need_install=()
installed_postgres=no
command -v pg_ctlcluster >/dev/null 2>&1 || { need_install+=(postgresql postgresql-client); installed_postgres=yes; }
command -v rabbitmq-server >/dev/null 2>&1 || need_install+=(rabbitmq-server)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "installing ${need_install[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_install[@]}" >/dev/null
fi

pg_ok() { psql -h 127.0.0.1 -U postgres -d postgres -qAtc 'select 1' >/dev/null 2>&1; }
if ! pg_ok; then
  for v in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main start 2>/dev/null || true
  done
  for _ in $(seq 1 30); do pg_ok && break; sleep 1; done
fi
if ! pg_ok && [ "${installed_postgres:-}" = yes ]; then
  # Postgres installed just now asks for passwords on TCP: trust loopback, as the project's
  # machines do. Only on an install this script made; an existing server's pg_hba.conf is
  # left as it is.
  for hba in /etc/postgresql/*/main/pg_hba.conf; do
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
      echo "fresh postgres install: trusting loopback connections in $hba"
      sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
  done
  for v in $(ls /etc/postgresql); do
    pg_ctlcluster --skip-systemctl-redirect "$v" main reload 2>/dev/null \
      || pg_ctlcluster --skip-systemctl-redirect "$v" main start
  done
  for _ in $(seq 1 30); do pg_ok && break; sleep 1; done
fi
pg_ok || {
  echo "postgres is not reachable on 127.0.0.1:5432 as user postgres without a password" >&2
  echo "(this project connects as postgres@127.0.0.1 with trust auth: a line" >&2
  echo "'host all all 127.0.0.1/32 trust' in pg_hba.conf allows it)" >&2
  exit 1
}

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  rabbitmq-server -detached
  for _ in $(seq 1 60); do rabbitmqctl -q status >/dev/null 2>&1 && break; sleep 1; done
fi
rabbitmqctl -q await_startup >/dev/null 2>&1 || { echo "rabbitmq did not start" >&2; exit 1; }
echo "postgres and rabbitmq are up"
