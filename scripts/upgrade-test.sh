#!/usr/bin/env bash
# A rolling upgrade across the newest migration, and the rollback over it: builds the
# commit before the newest migration (`git log -- migrations/`) beside the working tree,
# then runs tests/it/upgrade.rs: that older binary's processes beside this build's, on the
# schema this build migrated, each event run once and each run handed off once.
#   scripts/upgrade-test.sh [REV]   (default: the parent of the last commit that touched migrations/)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
rev=${1:-$(git log -1 --format=%H -- migrations/)^}
rev=$(git rev-parse --short "$rev")
tree=target/upgrade/$rev
export SQLX_OFFLINE=true
unset DATABASE_URL
[ -d "$tree" ] || git worktree add --detach -q "$tree" "$rev"
echo "== building $rev (the build before the newest migration) in $tree"
(cd "$tree" && CARGO_TARGET_DIR=$PWD/../target cargo build --locked --quiet --bin kongflow-events)
export KONGFLOW_OLD_BINARY=$PWD/target/upgrade/target/debug/kongflow-events KONGFLOW_OLD_REV=$rev
timeout 600 cargo test --locked --test it upgrade:: -- --ignored --nocapture
