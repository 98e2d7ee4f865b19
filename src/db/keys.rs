//! Tenant keys of the event-sized tables: the primary and unique keys of `event_records`,
//! `job_runs` and the ledger's table gain the environment, as every tenant table's have
//! (tests/it/tenant_keys.rs), so the schema can be distributed by environment (Citus)
//! without redesign. The small tables got theirs in a migration (20261206200000), and
//! `run_handoffs` in 20261210000001; these are large and written by every event, so
//! [`key_by_environment`] changes them online, as the last step of `storage partition`
//! (`app::partition_storage`): each new key built `CONCURRENTLY` (writes go on), then
//! swapped in for the old one in a transaction that holds the table's lock for
//! milliseconds. The id stays first in each key, so the lookups by id alone use it as they
//! used the old one. Each owner lists its keys: [`SLICED`] here (the sliced tables'
//! layout is `db::slices`'), the ledger's in `ledger::upkeep::KEYS`.
//!
//! Builds before this one name the old keys in `ON CONFLICT`; this build's statements name
//! none (`ON CONFLICT DO NOTHING`), so they run on both. Hence a step for the operator, once
//! every process runs this build, as slicing is; a new installation is keyed at migrate.

use std::time::Duration;

use sqlx::{Connection, PgConnection, PgPool};

use super::slices::{SLICING_LOCK, build_key, sql};

/// How a key is made.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Primary,
    /// A unique constraint.
    Unique,
    /// A unique index that is no constraint, with its predicate.
    UniqueIndex(&'static str),
}

/// A key that gains `environment_id`.
#[derive(Debug)]
pub struct Key {
    pub table: &'static str,
    /// The key it replaces (its constraint's name, or the index's).
    pub old: &'static str,
    /// Its name once keyed (the old one's where the name tells no columns).
    pub new: &'static str,
    /// Its columns, the environment last.
    pub columns: &'static str,
    pub kind: Kind,
    /// The suffix of the index built ahead on the table, or on each of its slices.
    pub ahead: &'static str,
}

/// The keys of the sliced tables.
pub const SLICED: [Key; 3] = [
    Key {
        table: "event_records",
        old: "event_records_pkey",
        new: "event_records_pkey",
        columns: "id, environment_id",
        kind: Kind::Primary,
        ahead: "pkey_tk",
    },
    Key {
        table: "job_runs",
        old: "job_runs_pkey",
        new: "job_runs_pkey",
        columns: "id, event_record_id, environment_id",
        kind: Kind::Primary,
        ahead: "pkey_tk",
    },
    Key {
        table: "job_runs",
        old: "job_runs_event_record_id_dispatcher_id_job_version_id_key",
        new: "job_runs_run_key",
        columns: "event_record_id, dispatcher_id, job_version_id, environment_id",
        kind: Kind::Unique,
        ahead: "run_tk",
    },
];

/// The keys among `keys` not yet holding the environment, by name (`table.key`).
pub async fn unkeyed(conn: &mut PgConnection, keys: &[&Key]) -> Result<Vec<String>, sqlx::Error> {
    let mut left = Vec::new();
    for key in keys {
        if !keyed(conn, key).await? {
            left.push(format!("{}.{}", key.table, key.old));
        }
    }
    Ok(left)
}

async fn keyed(conn: &mut PgConnection, key: &Key) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM pg_index ix
             JOIN pg_class i ON i.oid = ix.indexrelid
             JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = ANY (ix.indkey)
             WHERE ix.indrelid = $1::regclass AND i.relname = $2
               AND a.attname = 'environment_id')",
    )
    .bind(key.table)
    .bind(key.new)
    .fetch_one(&mut *conn)
    .await
}

/// Give each of `keys` the environment, online; keys that hold it already are left alone,
/// so a run cut short goes on where it stopped. One run at a time, under the slicing's
/// advisory lock (a second waits, then finds the keys done). Returns how many keys it
/// changed.
pub async fn key_by_environment(pool: &PgPool, keys: &[&Key]) -> Result<usize, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SLICING_LOCK)
        .execute(&mut *conn)
        .await?;
    let result = key_locked(&mut conn, keys).await;
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(SLICING_LOCK)
        .execute(&mut *conn)
        .await?;
    result
}

async fn key_locked(conn: &mut PgConnection, keys: &[&Key]) -> Result<usize, sqlx::Error> {
    let mut changed = 0;
    for key in keys {
        if keyed(conn, key).await? {
            continue;
        }
        // (1) The new key's index on each slice (or on the plain table), without stopping
        // writes.
        let parts = slices_of(conn, key.table).await?;
        for part in parts.unwrap_or_else(|| vec![key.table.to_string()]) {
            let on = match key.kind {
                Kind::UniqueIndex(predicate) => {
                    format!("{part} ({}) WHERE {predicate}", key.columns)
                }
                _ => format!("{part} ({})", key.columns),
            };
            build_key(conn, &format!("{part}_{}", key.ahead), &on).await?;
        }
        // (2) The swap, retried while the lock is not had within its timeout (a retention
        // pass detaching a slice, a long query).
        let mut attempt = 0;
        loop {
            attempt += 1;
            match swap(conn, key).await {
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some("55P03") && attempt < 5 =>
                {
                    tracing::warn!(
                        table = key.table,
                        key = key.new,
                        attempt,
                        "the table's lock was not had within 5 s; trying the key's swap again"
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                other => break other?,
            }
        }
        tracing::info!(
            table = key.table,
            key = key.new,
            columns = key.columns,
            "key holds the environment"
        );
        changed += 1;
    }
    Ok(changed)
}

/// The slices of `table`; `None` where it is not sliced.
async fn slices_of(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Option<Vec<String>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_partitioned_table
                                  WHERE partrelid = $1::regclass)
                THEN ARRAY(SELECT c.relname::text FROM pg_inherits h
                           JOIN pg_class c ON c.oid = h.inhrelid
                           WHERE h.inhparent = $1::regclass ORDER BY 1) END",
    )
    .bind(table)
    .fetch_one(&mut *conn)
    .await
}

/// Step (2) of a key: the old key dropped and the new one made of the indexes built ahead,
/// in one transaction. On a sliced table each slice's index becomes a unique constraint,
/// which the parent's new key takes over instead of building its own (a slice made since
/// step (1), empty, gets its index built here).
async fn swap(conn: &mut PgConnection, key: &Key) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query(sql(format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        key.table
    )))
    .execute(&mut *tx)
    .await?;
    let (table, old, new, columns) = (key.table, key.old, key.new, key.columns);
    let statement = match (slices_of(&mut tx, table).await?, key.kind) {
        (None, Kind::Primary) => format!(
            "ALTER TABLE {table} DROP CONSTRAINT {old},
                 ADD CONSTRAINT {new} PRIMARY KEY USING INDEX {table}_{}",
            key.ahead
        ),
        (None, Kind::Unique) => format!(
            "ALTER TABLE {table} DROP CONSTRAINT {old},
                 ADD CONSTRAINT {new} UNIQUE USING INDEX {table}_{}",
            key.ahead
        ),
        (None, Kind::UniqueIndex(_)) => format!(
            "DROP INDEX {old}; ALTER INDEX {table}_{} RENAME TO {new}",
            key.ahead
        ),
        (Some(parts), kind) => {
            for part in &parts {
                let ahead = format!("{part}_{}", key.ahead);
                let built: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM pg_index WHERE indexrelid = to_regclass($1)
                                    AND indisvalid)",
                )
                .bind(&ahead)
                .fetch_one(&mut *tx)
                .await?;
                if built {
                    sqlx::query(sql(format!(
                        "ALTER TABLE {part} ADD CONSTRAINT {ahead} UNIQUE USING INDEX {ahead}"
                    )))
                    .execute(&mut *tx)
                    .await?;
                }
            }
            let what = match kind {
                Kind::Primary => "PRIMARY KEY",
                _ => "UNIQUE",
            };
            format!(
                "ALTER TABLE {table} DROP CONSTRAINT {old}, ADD CONSTRAINT {new} {what} ({columns})"
            )
        }
    };
    sqlx::raw_sql(sql(statement)).execute(&mut *tx).await?;
    tx.commit().await
}
