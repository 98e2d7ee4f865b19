//! The ledger as the workers see it: taking jobs to run, recording a failure, and the
//! changes other work makes to a job by its arguments (cancel, move).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::outbox::back_to_outbox;
use super::{Job, JobArgs, JobKind, JobState, UnreadableJob, query_jobs, unique_key};

/// What [`take`] found for a set of ids.
#[derive(Debug, Default)]
pub struct Taken {
    /// Live jobs, locked and marked completed in the caller's transaction: the mark commits
    /// only with the handlers' work.
    pub jobs: Vec<Job>,
    /// Rows this build cannot read (also marked: the caller must not commit them).
    pub unreadable: Vec<UnreadableJob>,
    /// Ids the ledger has no row for.
    pub missing: Vec<i64>,
    /// An environment of the jobs taken has jobs of their kind waiting in the outbox for
    /// room in flight (as the statement saw it): only then is the room these jobs leave
    /// worth handing on ([`super::outbox::refill`]). Most batches have none, and skip that
    /// statement.
    pub others_wait: bool,
}

/// A row [`take`] returned: the job as [`super::JobRow`] has it, and whether its
/// environment has jobs of its kind waiting for room.
struct TakenRow {
    id: i64,
    kind: String,
    args: serde_json::Value,
    queue: String,
    priority: i16,
    state: String,
    attempt: i32,
    max_attempts: i32,
    run_at: DateTime<Utc>,
    errors: serde_json::Value,
    created_at: DateTime<Utc>,
    attempted_at: Option<DateTime<Utc>>,
    finalized_at: Option<DateTime<Utc>>,
    published_at: Option<DateTime<Utc>>,
    unique_key: Option<Vec<u8>>,
    trace_parent: Option<String>,
    environment_id: uuid::Uuid,
    waiting: bool,
}

impl TakenRow {
    fn split(self) -> (super::JobRow, bool) {
        let row = super::JobRow {
            id: self.id,
            kind: self.kind,
            args: self.args,
            queue: self.queue,
            priority: self.priority,
            state: self.state,
            attempt: self.attempt,
            max_attempts: self.max_attempts,
            run_at: self.run_at,
            errors: self.errors,
            created_at: self.created_at,
            attempted_at: self.attempted_at,
            finalized_at: self.finalized_at,
            published_at: self.published_at,
            unique_key: self.unique_key,
            trace_parent: self.trace_parent,
            environment_id: self.environment_id,
        };
        (row, self.waiting)
    }
}

/// Lock the live jobs among `ids` in id order and mark them completed (attempt + 1), in the
/// caller's transaction. A final job's id is neither taken nor missing: its message is a
/// duplicate. A job moved later (an event resent with a new time) is not taken by its old
/// message either: a new one is on its way.
pub async fn take(tx: &mut PgConnection, ids: &[i64]) -> Result<Taken, sqlx::Error> {
    take_where(tx, ids, false).await
}

/// [`take`] for jobs the caller holds by [`lease`] (their due time moved ahead).
pub async fn take_leased(tx: &mut PgConnection, ids: &[i64]) -> Result<Taken, sqlx::Error> {
    take_where(tx, ids, true).await
}

async fn take_where(
    tx: &mut PgConnection,
    ids: &[i64],
    leased: bool,
) -> Result<Taken, sqlx::Error> {
    // `waiting`: the job's environment has due jobs of its kind in the outbox (the jobs
    // marked here were published, so they are not among them). A group with a job that
    // waited for room itself is at its share: taken as waiting without asking (in a flood,
    // asking costs a walk over the outbox index's entries of jobs already published). The
    // others are asked once per environment and kind, by a function, so the check adds
    // little to this statement's plan.
    let rows = sqlx::query_as!(
        TakenRow,
        r#"WITH taken AS (
               UPDATE queue_jobs
               SET state = 'completed', attempt = attempt + 1, attempted_at = now(), finalized_at = now()
               WHERE id IN (
                   SELECT id FROM queue_jobs
                   WHERE id = ANY($1) AND NOT (state::text = ANY($2))
                     AND ($3 OR run_at <= now() + interval '1 second')
                   ORDER BY id FOR UPDATE)
               RETURNING *),
           groups AS (
               SELECT environment_id, kind,
                      CASE WHEN bool_or(awaits_room) THEN true
                           ELSE queue_jobs_waiting(environment_id, kind) END AS waiting
               FROM taken GROUP BY environment_id, kind)
           SELECT t.id, t.kind, t.args, t.queue, t.priority, t.state::text AS "state!",
                  t.attempt, t.max_attempts, t.run_at, t.errors, t.created_at, t.attempted_at,
                  t.finalized_at, t.published_at, t.unique_key, t.trace_parent, t.environment_id,
                  g.waiting AS "waiting!"
           FROM taken t JOIN groups g ON g.environment_id = t.environment_id AND g.kind = t.kind"#,
        ids,
        &JobState::final_names(),
        leased
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut others_wait = false;
    let rows = rows
        .into_iter()
        .map(|r| {
            let (row, waiting) = r.split();
            others_wait |= waiting;
            row
        })
        .collect();
    let mut taken = sort_out(&mut *tx, ids, rows).await?;
    taken.others_wait = others_wait;
    Ok(taken)
}

/// The rows a statement returned for `ids`, decoded, and which of the others have no row
/// at all.
async fn sort_out(
    conn: &mut PgConnection,
    ids: &[i64],
    rows: Vec<super::JobRow>,
) -> Result<Taken, sqlx::Error> {
    let mut taken = Taken::default();
    let returned: Vec<i64> = rows.iter().map(|r| r.id).collect();
    for row in rows {
        match Job::try_from(row) {
            Ok(job) => taken.jobs.push(job),
            Err(e) => taken.unreadable.push(e),
        }
    }
    if returned.len() < ids.len() {
        let others: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|id| !returned.contains(id))
            .collect();
        let known = sqlx::query_scalar!("SELECT id FROM queue_jobs WHERE id = ANY($1)", &others)
            .fetch_all(&mut *conn)
            .await?;
        taken.missing = others
            .into_iter()
            .filter(|id| !known.contains(id))
            .collect();
    }
    Ok(taken)
}

/// Lease the live, due jobs among `ids` for `hold`: their due time moves `hold` ahead, so
/// no other message of theirs runs them (a duplicate finds them not due and is acknowledged
/// with no effect) and the reconciler leaves them alone until the lease and its margin
/// pass. For a kind whose work happens outside the database before its job is taken (a
/// webhook): the holder then takes each with [`take_leased`], or records its failure.
///
/// A row another transaction holds locked is waited for, up to [`LEASE_LOCK_WAIT`]: the
/// relay holds a job's row until its publish is confirmed, and the message can arrive
/// before that; skipping the row would drop the message as a duplicate and leave the job
/// to the reconciler. Past the wait the statement fails (`lock_not_available`), and the
/// caller sends the message back for later. Commits on its own.
pub async fn lease(
    pool: &sqlx::PgPool,
    ids: &[i64],
    hold: std::time::Duration,
) -> Result<Taken, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "SELECT set_config('lock_timeout', $1, true)",
        format!("{}ms", LEASE_LOCK_WAIT.as_millis())
    )
    .fetch_one(&mut *tx)
    .await?;
    let rows = query_jobs!(
        r#"UPDATE queue_jobs SET run_at = now() + make_interval(secs => $3)
           WHERE id IN (
               SELECT id FROM queue_jobs
               WHERE id = ANY($1) AND NOT (state::text = ANY($2))
                 AND run_at <= now() + interval '1 second'
               ORDER BY id FOR UPDATE)
           RETURNING "#,
        "",
        ids,
        &JobState::final_names(),
        hold.as_secs_f64()
    )
    .fetch_all(&mut *tx)
    .await?;
    let taken = sort_out(&mut tx, ids, rows).await?;
    tx.commit().await?;
    Ok(taken)
}

/// Longest [`lease`] waits for a job's row another transaction holds (the relay's, while
/// its confirms come: short).
pub const LEASE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The environment of each of `ids` the ledger has (to give each environment its share of
/// the places before a job is leased).
pub async fn environments_of(
    pool: &PgPool,
    ids: &[i64],
) -> Result<Vec<(i64, uuid::Uuid)>, sqlx::Error> {
    let rows = sqlx::query!(
        "SELECT id, environment_id FROM queue_jobs WHERE id = ANY($1)",
        ids
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.environment_id)).collect())
}

/// A failed attempt, as the worker reports it.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub error: &'a str,
    /// `error`, `panic` or `permanent`.
    pub kind: &'a str,
    /// No attempt can succeed: discard now.
    pub permanent: bool,
}

/// What [`record_failure`] did.
#[derive(Debug, Clone)]
pub struct FailureRecorded {
    pub kind: Option<JobKind>,
    pub queue: String,
    pub attempt: i32,
    pub trace_parent: Option<String>,
    /// Discarded (after its last attempt, or a permanent failure) rather than retried.
    pub discarded: bool,
    /// When retried, how long until the next attempt.
    pub wait: Duration,
}

/// Record a failed attempt of a job that is not final: the error (message, attempt, time,
/// kind of failure) is appended to the job, which becomes `retryable`, due after
/// `wait(kind, attempt)`, or `discarded` after its last attempt or a permanent failure;
/// either way it goes back to the outbox (a discarded job's message goes to the dead
/// letters). A job of a kind this build does not know is discarded. `None` if the job is
/// final or gone.
pub async fn record_failure(
    tx: &mut PgConnection,
    id: i64,
    failure: &Failure<'_>,
    wait: impl Fn(JobKind, i32) -> Duration,
) -> Result<Option<FailureRecorded>, sqlx::Error> {
    let Some(row) = sqlx::query!(
        r#"SELECT kind, queue, attempt, trace_parent FROM queue_jobs
           WHERE id = $1 AND NOT (state::text = ANY($2))
           FOR UPDATE"#,
        id,
        &JobState::final_names()
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Ok(None);
    };
    let attempt = row.attempt + 1;
    // Postgres text cannot hold a NUL, and an error may quote outside text.
    let error = failure.error.replace('\0', "");
    let kind = JobKind::parse(&row.kind);
    let wait = kind.map_or(Duration::ZERO, |k| wait(k, attempt));
    let permanent = failure.permanent || kind.is_none();
    let discarded = sqlx::query_scalar!(
        r#"UPDATE queue_jobs SET
               attempt = $2,
               attempted_at = now(),
               errors = errors || jsonb_build_array(jsonb_build_object(
                   'at', now(), 'attempt', $2::int4, 'error', $3::text, 'kind', $4::text)),
               state = CASE WHEN $5 OR $2 >= max_attempts THEN 'discarded'::queue_job_state
                            ELSE 'retryable'::queue_job_state END,
               finalized_at = CASE WHEN $5 OR $2 >= max_attempts THEN now() END,
               run_at = CASE WHEN $5 OR $2 >= max_attempts THEN run_at
                             ELSE now() + make_interval(secs => $6) END
           WHERE id = $1
           RETURNING state = 'discarded' AS "discarded!""#,
        id,
        attempt,
        error,
        failure.kind,
        permanent,
        wait.as_secs_f64()
    )
    .fetch_one(&mut *tx)
    .await?;
    back_to_outbox(tx, &[id]).await?;
    Ok(Some(FailureRecorded {
        kind,
        queue: row.queue,
        attempt,
        trace_parent: row.trace_parent,
        discarded,
        wait,
    }))
}

/// Cancel the live job with these arguments, in the caller's transaction (its message,
/// when it comes, finds it final). Returns how many were cancelled (0 or 1).
pub async fn cancel_by_args(tx: &mut PgConnection, args: &JobArgs) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        r#"UPDATE queue_jobs SET state = 'cancelled', finalized_at = now()
           WHERE unique_key = $1 AND kind = $2 AND NOT (state::text = ANY($3))"#,
        &unique_key(args),
        args.kind().as_str(),
        &JobState::final_names()
    )
    .execute(&mut *tx)
    .await?
    .rows_affected())
}

/// Move the job with these arguments, if it has not run, to `run_at`, and put it back in
/// the outbox (the message already in the tiers finds it not due and is dropped).
pub async fn move_by_args(
    tx: &mut PgConnection,
    args: &JobArgs,
    run_at: DateTime<Utc>,
) -> Result<u64, sqlx::Error> {
    let moved = sqlx::query_scalar!(
        r#"UPDATE queue_jobs
           SET run_at = $2,
               state = CASE WHEN $2 > now() THEN 'scheduled'::queue_job_state
                            ELSE 'available'::queue_job_state END
           WHERE unique_key = $1 AND kind = $3 AND state IN ('scheduled', 'available', 'retryable')
           RETURNING id"#,
        &unique_key(args),
        run_at,
        args.kind().as_str()
    )
    .fetch_all(&mut *tx)
    .await?;
    back_to_outbox(tx, &moved).await
}
