#!/usr/bin/env bash
# Regenerate .sqlx/ (the query descriptions that let the crate build without a database).
# Needs a running Postgres; uses a scratch database migrated from migrations/.
set -euo pipefail
cd "$(dirname "$0")/.."
PGHOST=${PGHOST:-127.0.0.1}
PGUSER=${PGUSER:-postgres}
db=kongflow_sqlx_prepare
psql -h "$PGHOST" -U "$PGUSER" -qAt -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" postgres
psql -h "$PGHOST" -U "$PGUSER" -qAt -c "CREATE DATABASE $db" postgres
for f in migrations/*.sql; do
  psql -h "$PGHOST" -U "$PGUSER" -q -v ON_ERROR_STOP=1 -f "$f" "$db" >/dev/null
done
rm -rf .sqlx && mkdir .sqlx
touch src/lib.rs
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$PWD/.sqlx" DATABASE_URL="postgres://$PGUSER@$PGHOST/$db" \
  cargo check --all-targets --quiet
# The scratch database stays, so DATABASE_URL can point at it while developing.
echo "wrote $(ls .sqlx | wc -l) query files to .sqlx/"
