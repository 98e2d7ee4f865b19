//! Keeping `event_records` and `job_runs` bounded: settled events (delivered or cancelled)
//! older than the retention are deleted with their runs, in batches, and deleting an
//! environment deletes its events and runs (rows written per event carry no foreign keys:
//! see the initial migration).

use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use crate::ledger::{self, DeliverEventArgs, JobArgs};

/// The advisory lock held by the process deleting old events.
pub const EVENTS_RETENTION_LOCK: i64 = 0x6b66_6576_7265_746e;

/// What one batch deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub events: u64,
    pub runs: u64,
    /// EPHEMERAL dispatchers spent (fired or expired) longer ago than the retention, with
    /// their webhook attempts.
    pub dispatchers: u64,
}

impl std::ops::AddAssign for Deleted {
    fn add_assign(&mut self, other: Self) {
        self.events += other.events;
        self.runs += other.runs;
        self.dispatchers += other.dispatchers;
    }
}

/// One pass: events created more than `keep` ago that are delivered or cancelled, and their
/// runs, deleted `batch` events per statement (each its own short transaction, rows locked
/// by others skipped), until a batch comes back short. An event still due (not yet
/// delivered, however old) is kept; one delivery gave up on (its `deliverEvent` job
/// discarded or cancelled, due more than `keep` ago) goes too, in a last entry. Only the process holding the lock does it; the others
/// skip the pass. Then EPHEMERAL dispatchers spent longer ago than `keep` go, with their
/// attempts. Returns what each statement on events deleted, and a last entry for the
/// dispatchers when there were any.
pub async fn retain(
    pool: &PgPool,
    keep: Duration,
    batch: i64,
) -> Result<Vec<Deleted>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let locked = sqlx::query_scalar!("SELECT pg_try_advisory_lock($1)", EVENTS_RETENTION_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    if locked != Some(true) {
        return Ok(Vec::new());
    }
    let batch = batch.max(1);
    let mut batches = Vec::new();
    let result = loop {
        let deleted = sqlx::query!(
            r#"WITH doomed AS (
                   SELECT id FROM event_records
                   WHERE created_at < now() - make_interval(secs => $1)
                     AND (delivered_at IS NOT NULL OR cancelled_at IS NOT NULL)
                   LIMIT $2
                   FOR UPDATE SKIP LOCKED),
               runs AS (
                   DELETE FROM job_runs WHERE event_record_id IN (SELECT id FROM doomed)
                   RETURNING 1),
               events AS (
                   DELETE FROM event_records WHERE id IN (SELECT id FROM doomed)
                   RETURNING 1)
               SELECT (SELECT count(*) FROM events) AS "events!",
                      (SELECT count(*) FROM runs) AS "runs!""#,
            keep.as_secs_f64(),
            batch
        )
        .fetch_one(&mut *conn)
        .await;
        match deleted {
            Ok(d) => {
                let d = Deleted {
                    events: d.events as u64,
                    runs: d.runs as u64,
                    dispatchers: 0,
                };
                batches.push(d);
                if d.events < batch as u64 {
                    break Ok(batches);
                }
            }
            Err(e) => break Err(e),
        }
    };
    let result = match result {
        Ok(mut batches) => match retain_abandoned(&mut conn, keep, batch).await {
            Ok(d) => {
                if d.events > 0 {
                    batches.push(d);
                }
                Ok(batches)
            }
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let result = match result {
        Ok(mut batches) => retain_dispatchers(&mut conn, keep, batch)
            .await
            .map(|dispatchers| {
                if dispatchers > 0 {
                    batches.push(Deleted {
                        dispatchers,
                        ..Deleted::default()
                    });
                }
                batches
            }),
        Err(e) => Err(e),
    };
    sqlx::query_scalar!("SELECT pg_advisory_unlock($1)", EVENTS_RETENTION_LOCK)
        .fetch_one(&mut *conn)
        .await?;
    result
}

/// Delete events created and due more than `keep` ago that were never delivered nor
/// cancelled and whose `deliverEvent` job is no longer live (discarded, cancelled, or
/// already removed by the ledger's retention): delivery gave up on them. `batch` events
/// are looked at per statement; an event whose job is still live (due, running, retried)
/// stays. Returns what went, in one entry.
async fn retain_abandoned(
    conn: &mut sqlx::PgConnection,
    keep: Duration,
    batch: i64,
) -> Result<Deleted, sqlx::Error> {
    let mut total = Deleted::default();
    let mut after: Option<Uuid> = None;
    loop {
        let candidates = sqlx::query_scalar!(
            r#"SELECT id FROM event_records
               WHERE delivered_at IS NULL AND cancelled_at IS NULL
                 AND created_at < now() - make_interval(secs => $1)
                 AND deliver_at < now() - make_interval(secs => $1)
                 AND ($3::uuid IS NULL OR id > $3)
               ORDER BY id
               LIMIT $2"#,
            keep.as_secs_f64(),
            batch,
            after
        )
        .fetch_all(&mut *conn)
        .await?;
        let Some(last) = candidates.last() else {
            return Ok(total);
        };
        after = Some(*last);
        let jobs: Vec<JobArgs> = candidates
            .iter()
            .map(|id| JobArgs::DeliverEvent(DeliverEventArgs { id: *id }))
            .collect();
        let live = ledger::live(&mut *conn, &jobs).await?;
        let doomed: Vec<Uuid> = candidates
            .iter()
            .zip(live)
            .filter(|(_, live)| !live)
            .map(|(id, _)| *id)
            .collect();
        if !doomed.is_empty() {
            let d = sqlx::query!(
                r#"WITH doomed AS (
                       SELECT id FROM event_records
                       WHERE id = ANY($1) AND delivered_at IS NULL AND cancelled_at IS NULL
                       FOR UPDATE SKIP LOCKED),
                   runs AS (
                       DELETE FROM job_runs WHERE event_record_id IN (SELECT id FROM doomed)
                       RETURNING 1),
                   events AS (
                       DELETE FROM event_records WHERE id IN (SELECT id FROM doomed)
                       RETURNING 1)
                   SELECT (SELECT count(*) FROM events) AS "events!",
                          (SELECT count(*) FROM runs) AS "runs!""#,
                &doomed
            )
            .fetch_one(&mut *conn)
            .await?;
            total.events += d.events as u64;
            total.runs += d.runs as u64;
        }
        if (candidates.len() as i64) < batch {
            return Ok(total);
        }
    }
}

/// Delete EPHEMERAL dispatchers spent (fired, or expired) more than `keep` ago, with their
/// attempts, `batch` per statement. Returns how many.
async fn retain_dispatchers(
    conn: &mut sqlx::PgConnection,
    keep: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query!(
            r#"DELETE FROM event_dispatchers WHERE id IN (
                   SELECT id FROM event_dispatchers
                   WHERE dispatchable_type = 'EPHEMERAL'
                     AND COALESCE(fired_at, expires_at)
                         < now() - make_interval(secs => $1)
                   LIMIT $2 FOR UPDATE SKIP LOCKED)"#,
            keep.as_secs_f64(),
            batch
        )
        .execute(&mut *conn)
        .await?
        .rows_affected();
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}

/// Delete every event and run of an environment, `batch` events per statement. For an
/// environment being deleted: its row goes first, so no new event arrives.
pub async fn delete_environment_events(
    pool: &PgPool,
    environment: Uuid,
    batch: i64,
) -> Result<Deleted, sqlx::Error> {
    let batch = batch.max(1);
    let mut total = Deleted::default();
    loop {
        let d = sqlx::query!(
            r#"WITH doomed AS (
                   SELECT id FROM event_records WHERE environment_id = $1 LIMIT $2),
               events AS (
                   DELETE FROM event_records WHERE id IN (SELECT id FROM doomed) RETURNING 1)
               SELECT (SELECT count(*) FROM events) AS "events!""#,
            environment,
            batch
        )
        .fetch_one(pool)
        .await?;
        total.events += d.events as u64;
        if d.events < batch {
            break;
        }
    }
    // Runs by environment (an index of their own): those of events already gone too.
    loop {
        let runs = sqlx::query!(
            r#"DELETE FROM job_runs WHERE id IN (
                   SELECT id FROM job_runs WHERE environment_id = $1 LIMIT $2)"#,
            environment,
            batch
        )
        .execute(pool)
        .await?
        .rows_affected();
        total.runs += runs;
        if runs < batch as u64 {
            break;
        }
    }
    Ok(total)
}
