//! Keeping the ledger whole and small: the reconciler, retention of final jobs, and vacuum
//! where autovacuum does not keep up.

use std::time::Duration;

use sqlx::{ConnectOptions, Connection, PgPool};

use super::outbox::back_to_outbox;
use crate::db::keys::{Key, Kind};

/// The advisory lock that keeps reconcilers of several processes from running at once.
pub const RECONCILER_LOCK: i64 = 0x6b66_7265_636f_6e63;

/// The advisory lock held by the process doing retention.
pub const RETENTION_LOCK: i64 = 0x6b66_7265_7465_6e74;

/// The advisory lock held by the process vacuuming.
pub const VACUUM_LOCK: i64 = 0x6b66_7661_6375_756d;

/// The ledger's keys that gain the environment in `storage partition` (`db::keys`): its
/// primary key and its unique-job index, the id and the key first as before. A job's
/// arguments name ids of one environment, so the environment in the unique index forbids
/// no job it allowed.
pub const KEYS: [Key; 2] = [
    Key {
        table: "queue_jobs",
        old: "queue_jobs_pkey",
        new: "queue_jobs_pkey",
        columns: "id, environment_id",
        kind: Kind::Primary,
        ahead: "pkey_tk",
    },
    Key {
        table: "queue_jobs",
        old: "queue_jobs_unique_key_idx",
        new: "queue_jobs_unique_key_idx",
        columns: "unique_key, environment_id",
        kind: Kind::UniqueIndex(
            "unique_key IS NOT NULL AND state NOT IN ('cancelled', 'discarded')",
        ),
        ahead: "ukey_tk",
    },
];

/// Most jobs one reconciler pass puts back.
pub const RECONCILE_BATCH: i64 = 10_000;

/// One reconciler pass: jobs not final, overdue by more than `margin` (counted from their
/// due time or their publication, whichever is later), go back to the outbox, up to
/// [`RECONCILE_BATCH`] per pass. Only one process does this at a time (a transaction-scoped
/// advisory lock; the others skip the pass). Returns how many.
pub async fn reconcile(pool: &PgPool, margin: Duration) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let locked = sqlx::query_scalar!("SELECT pg_try_advisory_xact_lock($1)", RECONCILER_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if locked != Some(true) {
        return Ok(0);
    }
    let overdue = sqlx::query_scalar!(
        r#"SELECT id FROM queue_jobs
           WHERE state IN ('scheduled', 'available', 'retryable')
             AND published_at IS NOT NULL
             AND run_at < now() - make_interval(secs => $1)
             AND published_at < now() - make_interval(secs => $1)
           ORDER BY run_at
           LIMIT $2
           FOR UPDATE SKIP LOCKED"#,
        margin.as_secs_f64(),
        RECONCILE_BATCH
    )
    .fetch_all(&mut *tx)
    .await?;
    let n = back_to_outbox(&mut tx, &overdue).await?;
    tx.commit().await?;
    Ok(n)
}

/// How long final jobs are kept, and how many one statement deletes.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub completed: Duration,
    pub discarded: Duration,
    pub batch: i64,
}

/// One retention pass: completed jobs finalized more than `completed` ago, and discarded
/// or cancelled ones more than `discarded` ago, are deleted in batches of `batch`, each its
/// own short statement, so no lock on the ledger is held for long. Only the process holding
/// the retention advisory lock (a session lock on one connection) does it; the others skip
/// the pass. A discarded job whose dead letter is not yet published is kept. Returns how
/// many each statement deleted (none when another process holds the lock).
pub async fn retain(pool: &PgPool, r: Retention) -> Result<Vec<u64>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked = sqlx::query_scalar!("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if locked != Some(true) {
        return Ok(Vec::new());
    }
    let batch = r.batch.max(1);
    let mut batches = Vec::new();
    let result = loop {
        let deleted = sqlx::query!(
            r#"DELETE FROM queue_jobs WHERE id IN (
                   SELECT id FROM queue_jobs
                   WHERE state IN ('completed', 'discarded', 'cancelled')
                     AND finalized_at < now() - make_interval(secs => LEAST($1::float8, $2::float8))
                     AND CASE state
                           WHEN 'completed' THEN finalized_at < now() - make_interval(secs => $1)
                           WHEN 'cancelled' THEN finalized_at < now() - make_interval(secs => $2)
                           ELSE published_at IS NOT NULL
                                AND finalized_at < now() - make_interval(secs => $2)
                         END
                   LIMIT $3
                   FOR UPDATE SKIP LOCKED)"#,
            r.completed.as_secs_f64(),
            r.discarded.as_secs_f64(),
            batch
        )
        .execute(&mut *conn)
        .await;
        match deleted {
            Ok(d) => {
                batches.push(d.rows_affected());
                if d.rows_affected() < batch as u64 {
                    break Ok(batches);
                }
            }
            Err(e) => break Err(e),
        }
    };
    // The lock is the session's: give it back before the connection returns to the pool.
    sqlx::query_scalar!("SELECT pg_advisory_unlock($1)", RETENTION_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    result
}

/// The tables the hot path updates or deletes from (each job row is updated when it ends,
/// each event when it is delivered, each run's hand-off deleted once published), and those
/// it only inserts into which retention deletes from (`job_runs`; `event_keys`, whose rows
/// go by the million when a slice is dropped).
pub const CHURNED_TABLES: [&str; 5] = [
    "queue_jobs",
    "event_records",
    "job_runs",
    "run_handoffs",
    "event_keys",
];

/// The bytes on disk of each of [`CHURNED_TABLES`], indexes and TOAST included (all its
/// slices, where it is sliced).
pub async fn table_sizes(pool: &PgPool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT c.relname::text AS "table!",
                  CASE WHEN c.relkind = 'p'
                       THEN (SELECT COALESCE(sum(pg_total_relation_size(p.relid)), 0)::int8
                             FROM pg_partition_tree(c.oid) p)
                       ELSE pg_total_relation_size(c.oid) END AS "bytes!"
           FROM pg_class c
           WHERE c.relname = ANY($1) AND c.relkind IN ('r', 'p')
             AND c.relnamespace = current_schema()::regnamespace"#,
        &CHURNED_TABLES.map(String::from)[..]
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.table, r.bytes)).collect())
}

/// A table is vacuumed when its dead rows reach this many, and this share of its live ones.
pub const VACUUM_MIN_DEAD: i64 = 10_000;
pub const VACUUM_DEAD_SHARE: f64 = 0.1;

/// What one vacuum pass did to a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Vacuumed {
    pub table: String,
    /// Dead rows before: `None` when only statistics were gathered (`ANALYZE`).
    pub dead: Option<i64>,
    pub took: Duration,
}

/// Rows written to a table (or slice) never analyzed that get it analyzed by the vacuum
/// pass: without statistics the planner takes an id list to match hundreds of rows (the
/// keys led by the id hold the environment too, so no index tells it the id alone is
/// unique) and reads a whole table where an index would do.
pub const FIRST_ANALYZE_MIN: i64 = 1_000;

/// One vacuum pass: each of [`CHURNED_TABLES`] whose dead rows reached [`VACUUM_MIN_DEAD`]
/// and [`VACUUM_DEAD_SHARE`] of its live rows, with no vacuum (autovacuum's or ours) within
/// `interval`, is vacuumed and analyzed; one whose rows changed that much since its last
/// analyze is analyzed, and one never analyzed once [`FIRST_ANALYZE_MIN`] rows were written
/// (a new slice, a new installation's tables). Where autovacuum keeps up (the migrations
/// give these tables tighter thresholds than its defaults), nothing reaches the thresholds
/// and the pass does nothing; where it is off or behind, every job row's dead version would
/// otherwise stay in the indexes the workers and the reconciler walk. Throttled as
/// autovacuum is (2 ms pauses), `SKIP_LOCKED`, one process at a time (an advisory lock).
pub async fn vacuum(pool: &PgPool, interval: Duration) -> Result<Vec<Vacuumed>, sqlx::Error> {
    // A connection of its own, closed after the pass: its session settings never reach the
    // pool, and a vacuum that takes seconds is not logged as a slow statement.
    let options = (*pool.connect_options())
        .clone()
        .disable_statement_logging();
    let mut conn = options.connect().await?;
    let locked = sqlx::query_scalar!("SELECT pg_try_advisory_lock($1)", VACUUM_LOCK)
        .fetch_one(&mut conn)
        .await?;
    let result = match locked {
        Some(true) => vacuum_locked(&mut conn, interval).await,
        _ => Ok(Vec::new()),
    };
    // Closing the session gives the advisory lock back.
    conn.close().await?;
    result
}

async fn vacuum_locked(
    conn: &mut sqlx::PgConnection,
    interval: Duration,
) -> Result<Vec<Vacuumed>, sqlx::Error> {
    let tables: Vec<String> = CHURNED_TABLES.iter().map(|t| t.to_string()).collect();
    let due = sqlx::query!(
        r#"SELECT relname AS "table!", n_dead_tup AS "dead!",
                  n_dead_tup >= GREATEST($2::int8, ($3::float8 * n_live_tup)::int8)
                    AND COALESCE(GREATEST(last_vacuum, last_autovacuum), '-infinity')
                        < now() - make_interval(secs => $4) AS "vacuum!",
                  (n_mod_since_analyze >= GREATEST($2::int8, ($3::float8 * n_live_tup)::int8)
                     AND COALESCE(GREATEST(last_analyze, last_autoanalyze), '-infinity')
                         < now() - make_interval(secs => $4))
                    OR (last_analyze IS NULL AND last_autoanalyze IS NULL
                        AND n_mod_since_analyze >= $5) AS "analyze!"
           FROM pg_stat_user_tables s
           WHERE schemaname = current_schema()
             AND (relname = ANY($1)
                  OR EXISTS (SELECT 1 FROM pg_inherits i
                             WHERE i.inhrelid = s.relid AND i.inhparent::regclass::text = ANY($1)))
           ORDER BY relname"#,
        &tables,
        VACUUM_MIN_DEAD,
        VACUUM_DEAD_SHARE,
        interval.as_secs_f64(),
        FIRST_ANALYZE_MIN
    )
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query!("SET vacuum_cost_delay = '2ms'")
        .execute(&mut *conn)
        .await?;
    let mut done = Vec::new();
    for t in due {
        // One of CHURNED_TABLES, or a slice of one (a partition: the catalog's name for it,
        // matched above), never from input.
        let table = format!("\"{}\"", t.table.replace('"', "\"\""));
        let started = std::time::Instant::now();
        let (statement, dead) = if t.vacuum {
            (
                format!("VACUUM (ANALYZE, SKIP_LOCKED) {table}"),
                Some(t.dead),
            )
        } else if t.analyze {
            (format!("ANALYZE (SKIP_LOCKED) {table}"), None)
        } else {
            continue;
        };
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut *conn)
            .await?;
        done.push(Vacuumed {
            table: t.table,
            dead,
            took: started.elapsed(),
        });
    }
    Ok(done)
}
