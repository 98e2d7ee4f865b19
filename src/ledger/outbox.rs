//! The ledger as the outbox: claiming unpublished jobs for the relay, taking a mark back,
//! putting jobs back, and waking the relays.

use sqlx::{PgConnection, PgPool};

use super::{Job, JobArgs, UnreadableJob, query_jobs, unique_key};

/// The channel relays listen on. Inserting jobs notifies it (a statement-level trigger);
/// every other way back into the outbox goes through [`back_to_outbox`], which does too.
pub const NOTIFY_CHANNEL: &str = "kongflow_outbox";

/// What a claim took: the jobs to publish, and rows this build cannot read (claimed too,
/// so the caller must take their marks back).
#[derive(Debug, Default)]
pub struct Claimed {
    pub jobs: Vec<Job>,
    pub unreadable: Vec<UnreadableJob>,
}

/// Claim up to `limit` unpublished jobs, due or not (a job due later goes into the delay
/// tiers), oldest due first, and write their published mark, in the caller's transaction:
/// rows locked by another relay are skipped. A job due now becomes `available`. The mark
/// must be taken back ([`unmark`]) for every message the broker does not confirm, before the
/// transaction commits.
pub async fn claim(tx: &mut PgConnection, limit: i64) -> Result<Claimed, sqlx::Error> {
    let rows = query_jobs!(
        r#"UPDATE queue_jobs
           SET published_at = now(),
               state = CASE WHEN state IN ('scheduled', 'retryable') AND run_at <= now()
                            THEN 'available'::queue_job_state ELSE state END
           WHERE id IN (
               SELECT id FROM queue_jobs
               WHERE published_at IS NULL
                 AND state IN ('scheduled', 'available', 'retryable', 'discarded')
               ORDER BY run_at, id
               LIMIT $1
               FOR UPDATE SKIP LOCKED)
           RETURNING "#,
        "",
        limit
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut claimed = Claimed::default();
    for row in rows {
        match Job::try_from(row) {
            Ok(job) => claimed.jobs.push(job),
            Err(e) => claimed.unreadable.push(e),
        }
    }
    claimed.jobs.sort_by_key(|j| (j.run_at, j.id));
    Ok(claimed)
}

/// Take back the published mark of claimed jobs whose message was not confirmed: they stay
/// in the outbox. No wake-up: the relay comes back to them on its next pass.
pub async fn unmark(tx: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    if ids.is_empty() {
        return Ok(0);
    }
    Ok(sqlx::query!(
        "UPDATE queue_jobs SET published_at = NULL WHERE id = ANY($1)",
        ids
    )
    .execute(&mut *tx)
    .await?
    .rows_affected())
}

/// Put jobs back in the outbox (their message will be published again) and wake the
/// relays; in the caller's transaction, so both happen at its commit.
pub async fn back_to_outbox(tx: &mut PgConnection, ids: &[i64]) -> Result<u64, sqlx::Error> {
    let n = unmark(tx, ids).await?;
    if n > 0 {
        wake_relays(tx).await?;
    }
    Ok(n)
}

/// Notify the relays' channel (delivered at commit).
async fn wake_relays(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query!("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// What waits in the ledger, for the gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxStats {
    /// Jobs not yet published.
    pub backlog: i64,
    /// Seconds since the oldest of them was created or last attempted.
    pub oldest_age_secs: f64,
    /// Jobs published into the delay tiers and not yet due.
    pub delayed: i64,
}

pub async fn stats(pool: &PgPool) -> Result<OutboxStats, sqlx::Error> {
    let outbox = sqlx::query!(
        r#"SELECT count(*) AS "backlog!",
                  EXTRACT(EPOCH FROM now() - min(COALESCE(attempted_at, created_at)))::float8 AS oldest
           FROM queue_jobs
           WHERE published_at IS NULL
             AND state IN ('scheduled', 'available', 'retryable', 'discarded')"#
    )
    .fetch_one(pool)
    .await?;
    let delayed = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM queue_jobs
           WHERE state IN ('scheduled', 'retryable') AND published_at IS NOT NULL
             AND run_at > now()"#
    )
    .fetch_one(pool)
    .await?;
    Ok(OutboxStats {
        backlog: outbox.backlog,
        oldest_age_secs: outbox.oldest.unwrap_or(0.0).max(0.0),
        delayed,
    })
}

/// Put back in the outbox the live jobs with these arguments that left it in an earlier
/// transaction: a request sent again (an event id already stored) re-arms its job, because
/// the process that committed it may have died before publishing it (the fast path). If its
/// message did go out, the second one finds the job final and has no effect. Returns how
/// many were put back.
pub async fn rearm_by_args(tx: &mut PgConnection, args: &[JobArgs]) -> Result<u64, sqlx::Error> {
    if args.is_empty() {
        return Ok(0);
    }
    let keys: Vec<Vec<u8>> = args.iter().map(unique_key).collect();
    let rearmed = sqlx::query_scalar!(
        r#"SELECT id FROM queue_jobs
           WHERE unique_key = ANY($1) AND state IN ('scheduled', 'available')
             AND published_at < now()
           FOR UPDATE SKIP LOCKED"#,
        &keys
    )
    .fetch_all(&mut *tx)
    .await?;
    back_to_outbox(tx, &rearmed).await
}
