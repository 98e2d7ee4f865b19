//! Keeping the ledger whole and small: the reconciler, and retention of final jobs.

use std::time::Duration;

use sqlx::PgPool;

use super::outbox::back_to_outbox;

/// The advisory lock that keeps reconcilers of several processes from running at once.
pub const RECONCILER_LOCK: i64 = 0x6b66_7265_636f_6e63;

/// The advisory lock held by the process doing retention.
pub const RETENTION_LOCK: i64 = 0x6b66_7265_7465_6e74;

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
