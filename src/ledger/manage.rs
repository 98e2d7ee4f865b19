//! The ledger as an operator steers it (`kongflow-events jobs`): list, get, retry, cancel.

use sqlx::PgPool;
use uuid::Uuid;

use super::outbox::back_to_outbox;
use super::{Job, JobState, UnreadableJob, decode_all, query_jobs};

/// Which jobs a listing shows.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// Any of these states (all when `None`).
    pub states: Option<Vec<JobState>>,
    /// Only this environment's jobs.
    pub environment: Option<Uuid>,
    pub limit: i64,
    /// Only jobs with a larger id: the cursor the previous page printed.
    pub after: Option<i64>,
}

/// Why an operator's change was not made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no job {0}")]
    NotFound(i64),
    #[error("job {id} is {state}: nothing to do")]
    Unchanged { id: i64, state: &'static str },
    #[error("job {id} cannot run again: job {other} with the same arguments is live")]
    Duplicate { id: i64, other: i64 },
    #[error(transparent)]
    Unreadable(#[from] UnreadableJob),
}

/// Why an operator's call did not end with its answer: the ledger refused the change, or the
/// database failed.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<UnreadableJob> for ManageError {
    fn from(e: UnreadableJob) -> Self {
        Self::Refused(e.into())
    }
}

/// Whether every one of `states` is one `queue_jobs_failed_idx` holds. A statement given
/// such states also says so in SQL (`NOT $n OR state IN (...)`, which a custom plan folds
/// to the index's predicate), so the planner may use that index.
fn only_failed(states: &[JobState]) -> bool {
    !states.is_empty()
        && states.iter().all(|s| {
            matches!(
                s,
                JobState::Retryable | JobState::Discarded | JobState::Cancelled
            )
        })
}

fn names(states: &[JobState]) -> Vec<String> {
    states.iter().map(|s| s.as_str().to_string()).collect()
}

/// A page of jobs in id order, and the cursor of the next page if there may be one.
pub async fn list(pool: &PgPool, l: &Listing) -> Result<(Vec<Job>, Option<i64>), ManageError> {
    let states = l.states.as_deref().map(names);
    let rows = query_jobs!(
        "SELECT ",
        r#" FROM queue_jobs
           WHERE ($1::text IS NULL OR queue = $1)
             AND ($2::text IS NULL OR kind = $2)
             AND ($3::text[] IS NULL OR state::text = ANY($3))
             AND (NOT $7 OR state IN ('retryable', 'discarded', 'cancelled'))
             AND ($6::uuid IS NULL OR environment_id = $6)
             AND id > $4
           ORDER BY id
           LIMIT $5"#,
        l.queue,
        l.kind,
        states.as_deref(),
        l.after.unwrap_or(0),
        l.limit,
        l.environment,
        l.states.as_deref().is_some_and(only_failed)
    )
    .fetch_all(pool)
    .await?;
    let jobs = decode_all(rows)?;
    let next = (jobs.len() as i64 == l.limit)
        .then(|| jobs.last().map(|j| j.id))
        .flatten();
    Ok((jobs, next))
}

/// One job.
pub async fn get(pool: &PgPool, id: i64) -> Result<Job, ManageError> {
    let row = query_jobs!("SELECT ", " FROM queue_jobs WHERE id = $1", id)
        .fetch_optional(pool)
        .await?;
    match row {
        Some(r) => Ok(Job::try_from(r)?),
        None => Err(Refusal::NotFound(id).into()),
    }
}

/// Make a job available to run now, as River's `job retry` does: its attempt count and its
/// errors stay; a job that used its last attempt gets one more. A job already available is
/// left alone. Refused while a live job has the same unique key.
pub async fn retry(pool: &PgPool, id: i64) -> Result<Job, ManageError> {
    let mut tx = pool.begin().await?;
    let Some(current) = sqlx::query!(
        r#"SELECT state::text AS "state!", unique_key FROM queue_jobs WHERE id = $1 FOR UPDATE"#,
        id
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Err(Refusal::NotFound(id).into());
    };
    if current.state == JobState::Available.as_str() {
        return Err(Refusal::Unchanged {
            id,
            state: JobState::Available.as_str(),
        }
        .into());
    }
    if let Some(key) = &current.unique_key {
        let other = sqlx::query_scalar!(
            r#"SELECT id FROM queue_jobs
               WHERE unique_key = $1 AND id <> $2 AND state NOT IN ('cancelled', 'discarded')"#,
            key,
            id
        )
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(other) = other {
            return Err(Refusal::Duplicate { id, other }.into());
        }
    }
    let row = query_jobs!(
        r#"UPDATE queue_jobs SET state = 'available', run_at = now(), finalized_at = NULL,
                  max_attempts = GREATEST(max_attempts, attempt + 1)
           WHERE id = $1
           RETURNING "#,
        "",
        id
    )
    .fetch_one(&mut *tx)
    .await?;
    back_to_outbox(&mut tx, &[id]).await?;
    tx.commit().await?;
    Ok(Job::try_from(row)?)
}

/// Which jobs a bulk retry takes: those in `states` (available ones are left alone), of
/// `kind` and of `environment` when given.
#[derive(Debug, Clone, Default)]
pub struct Matching {
    pub states: Vec<JobState>,
    pub kind: Option<String>,
    pub environment: Option<Uuid>,
}

impl Matching {
    fn state_names(&self) -> Vec<String> {
        names(&self.states)
            .into_iter()
            .filter(|s| s != JobState::Available.as_str())
            .collect()
    }
}

/// How many jobs a bulk retry of `m` would look at (the console asks before it retries).
pub async fn count_matching(pool: &PgPool, m: &Matching) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM queue_jobs
           WHERE state::text = ANY($1) AND ($2::text IS NULL OR kind = $2)
             AND (NOT $4 OR state IN ('retryable', 'discarded', 'cancelled'))
             AND ($3::uuid IS NULL OR environment_id = $3)"#,
        &m.state_names(),
        m.kind.as_deref(),
        m.environment,
        only_failed(&m.states)
    )
    .fetch_one(pool)
    .await
}

/// Retry every job `m` takes, as [`retry`] does one; jobs whose unique key a live job
/// holds are skipped. Returns the ids retried.
pub async fn retry_matching(pool: &PgPool, m: &Matching) -> Result<Vec<i64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let ids = sqlx::query_scalar!(
        r#"UPDATE queue_jobs q SET state = 'available', run_at = now(), finalized_at = NULL,
                  max_attempts = GREATEST(max_attempts, attempt + 1)
           WHERE q.state::text = ANY($1) AND ($2::text IS NULL OR q.kind = $2)
             AND (NOT $4 OR q.state IN ('retryable', 'discarded', 'cancelled'))
             AND ($3::uuid IS NULL OR q.environment_id = $3)
             AND NOT EXISTS (
                 SELECT 1 FROM queue_jobs o
                 WHERE o.unique_key = q.unique_key AND o.id <> q.id
                   AND o.state NOT IN ('cancelled', 'discarded'))
           RETURNING q.id"#,
        &m.state_names(),
        m.kind.as_deref(),
        m.environment,
        only_failed(&m.states)
    )
    .fetch_all(&mut *tx)
    .await?;
    back_to_outbox(&mut tx, &ids).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Cancel a job that is not final: it will not run (a message already on its way is
/// acknowledged with no effect).
pub async fn cancel(pool: &PgPool, id: i64) -> Result<Job, ManageError> {
    let row = query_jobs!(
        r#"UPDATE queue_jobs SET state = 'cancelled', finalized_at = now()
           WHERE id = $1 AND NOT (state::text = ANY($2))
           RETURNING "#,
        "",
        id,
        &JobState::final_names()
    )
    .fetch_optional(pool)
    .await?;
    match row {
        Some(r) => Ok(Job::try_from(r)?),
        None => {
            let job = get(pool, id).await?;
            Err(Refusal::Unchanged {
                id,
                state: job.state.as_str(),
            }
            .into())
        }
    }
}

/// The ledger state of each of `ids` that it has (for the dead letters' view).
pub async fn states_of(pool: &PgPool, ids: &[i64]) -> Result<Vec<(i64, String)>, sqlx::Error> {
    Ok(sqlx::query!(
        r#"SELECT id, state::text AS "state!" FROM queue_jobs WHERE id = ANY($1)"#,
        ids
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.id, r.state))
    .collect())
}

/// Cancel every job of an environment that is not final (its environment is being
/// deleted): the relay no longer claims them, and a worker that receives one of their
/// messages finds it final and only acknowledges it. Retention deletes them later. Returns
/// how many.
pub async fn cancel_environment(
    pool: &PgPool,
    environment: uuid::Uuid,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query!(
        r#"UPDATE queue_jobs SET state = 'cancelled', finalized_at = now(), awaits_room = false
           WHERE environment_id = $1 AND state IN ('scheduled', 'available', 'retryable')"#,
        environment
    )
    .execute(pool)
    .await?
    .rows_affected())
}

/// An environment's jobs of one kind as the console's overview shows them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KindFigures {
    pub kind: String,
    /// Due, not yet published (in the outbox).
    pub backlog: i64,
    /// Published, not final (in a work queue or running).
    pub in_flight: i64,
    /// Not yet due (in the outbox or the delay tiers).
    pub delayed: i64,
    /// Jobs that ended over the window, and their wait from due to their last start
    /// (seconds; a job retried by hand after its last start is not counted).
    pub started: i64,
    /// Of those, discarded (each copied to the dead letters).
    pub discarded: i64,
    pub latency_p50: Option<f64>,
    pub latency_p99: Option<f64>,
    /// The p99 of each minute of the window, oldest first (`None`: no job ended in it).
    pub p99_per_minute: Vec<Option<f64>>,
}

/// The figures of each kind of `environment`'s jobs, latencies over the last `window`:
/// the live jobs through the two partial indexes by environment, the finished ones through
/// the index of final jobs by their end.
pub async fn kind_figures(
    pool: &PgPool,
    environment: Uuid,
    window: std::time::Duration,
) -> Result<Vec<KindFigures>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"WITH outbox AS (
               -- queue_jobs_fair_outbox_idx: the environment's unpublished jobs.
               SELECT kind, count(*) FILTER (WHERE run_at <= now()) AS due,
                      count(*) FILTER (WHERE run_at > now()) AS later
               FROM queue_jobs
               WHERE environment_id = $1 AND published_at IS NULL
                 AND state IN ('scheduled', 'available', 'retryable')
               GROUP BY kind),
           flight AS (
               -- queue_jobs_in_flight_idx: published, not final (due: in a work queue;
               -- not yet due: in the delay tiers).
               SELECT kind, count(*) FILTER (WHERE run_at <= now()) AS due,
                      count(*) FILTER (WHERE run_at > now()) AS later
               FROM queue_jobs
               WHERE environment_id = $1 AND published_at IS NOT NULL
                 AND state IN ('scheduled', 'available', 'retryable')
               GROUP BY kind),
           ended AS MATERIALIZED (
               -- queue_jobs_finalized_idx: final jobs by their end.
               SELECT kind, state, EXTRACT(EPOCH FROM attempted_at - run_at) AS wait,
                      (EXTRACT(EPOCH FROM date_trunc('minute', now())
                                          - date_trunc('minute', finalized_at)) / 60)::int AS ago
               FROM queue_jobs
               WHERE state IN ('completed', 'discarded', 'cancelled')
                 AND finalized_at > now() - make_interval(secs => $2)
                 AND environment_id = $1 AND attempted_at >= run_at),
           done AS (
               SELECT kind, count(*) AS started,
                      count(*) FILTER (WHERE state = 'discarded') AS discarded,
                      percentile_cont(0.5) WITHIN GROUP (ORDER BY wait) AS p50,
                      percentile_cont(0.99) WITHIN GROUP (ORDER BY wait) AS p99
               FROM ended GROUP BY kind),
           minutes AS (
               SELECT kind, array_agg(ago ORDER BY ago) AS agos,
                      array_agg(p99 ORDER BY ago) AS p99s
               FROM (SELECT kind, ago,
                            percentile_cont(0.99) WITHIN GROUP (ORDER BY wait) AS p99
                     FROM ended GROUP BY kind, ago) m
               GROUP BY kind),
           kinds AS (SELECT kind FROM outbox UNION SELECT kind FROM flight
                     UNION SELECT kind FROM done)
           SELECT k.kind AS "kind!",
                  COALESCE(o.due, 0) AS "backlog!", COALESCE(f.due, 0) AS "in_flight!",
                  COALESCE(o.later, 0) + COALESCE(f.later, 0) AS "delayed!",
                  COALESCE(d.started, 0) AS "started!",
                  COALESCE(d.discarded, 0) AS "discarded!",
                  d.p50::float8 AS p50, d.p99::float8 AS p99,
                  m.agos AS "agos: Vec<i32>", m.p99s AS "p99s: Vec<f64>"
           FROM kinds k
           LEFT JOIN outbox o ON o.kind = k.kind
           LEFT JOIN flight f ON f.kind = k.kind
           LEFT JOIN done d ON d.kind = k.kind
           LEFT JOIN minutes m ON m.kind = k.kind
           ORDER BY 1"#,
        environment,
        window.as_secs_f64()
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| KindFigures {
            kind: r.kind,
            backlog: r.backlog,
            in_flight: r.in_flight,
            delayed: r.delayed,
            started: r.started,
            discarded: r.discarded,
            latency_p50: r.p50,
            latency_p99: r.p99,
            p99_per_minute: {
                let minutes = (window.as_secs() / 60).max(1) as usize;
                let mut per = vec![None; minutes];
                for (ago, p99) in r
                    .agos
                    .unwrap_or_default()
                    .into_iter()
                    .zip(r.p99s.unwrap_or_default())
                {
                    if let Some(slot) = usize::try_from(ago)
                        .ok()
                        .filter(|a| *a < minutes)
                        .map(|a| minutes - 1 - a)
                    {
                        per[slot] = Some(p99);
                    }
                }
                per
            },
        })
        .collect())
}
