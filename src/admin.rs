//! The operator's view of the job ledger and the dead-letter queue, behind
//! `kongflow-events jobs ...`: list, get, retry, cancel, dead letters and their replay; and
//! the table `kongflow-events events list` prints.

use chrono::{DateTime, Utc};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

use crate::amqp::message::{header_int, header_text};
use crate::amqp::publish::{
    ATTEMPTS_HEADER, DEAD_AT_HEADER, JOB_ID_HEADER, KIND_HEADER, REASON_HEADER,
};
use crate::amqp::{JobMessage, Topology};
use crate::dates::iso;
pub use crate::ledger::manage::Refusal;
use crate::ledger::manage::{self, Listing};
use crate::ledger::{Job, JobState};

/// Which jobs `jobs list` shows.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// `failed` means retryable or discarded.
    pub state: Option<StateFilter>,
    /// Only this environment's jobs.
    pub environment: Option<uuid::Uuid>,
    pub limit: i64,
    /// Only jobs with a larger id: the cursor the previous page printed.
    pub after: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    One(JobState),
    Failed,
}

impl std::str::FromStr for StateFilter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "failed" {
            return Ok(Self::Failed);
        }
        JobState::parse(s).map(Self::One).ok_or_else(|| {
            format!(
                "unknown state {s:?}: scheduled, available, retryable, completed, discarded, \
                 cancelled or failed"
            )
        })
    }
}

impl StateFilter {
    pub fn states(self) -> Vec<JobState> {
        match self {
            Self::One(s) => vec![s],
            Self::Failed => vec![JobState::Retryable, JobState::Discarded],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The ledger did not make the change, and says why.
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
}

impl From<manage::ManageError> for AdminError {
    fn from(e: manage::ManageError) -> Self {
        match e {
            manage::ManageError::Refused(r) => Self::Refused(r),
            manage::ManageError::Db(e) => Self::Db(e),
        }
    }
}

/// A page of jobs in id order, and the cursor of the next page if there may be one.
pub async fn list_jobs(
    pool: &PgPool,
    filter: &JobFilter,
) -> Result<(Vec<Job>, Option<i64>), AdminError> {
    let listing = Listing {
        queue: filter.queue.clone(),
        kind: filter.kind.clone(),
        states: filter.state.map(StateFilter::states),
        environment: filter.environment,
        limit: filter.limit,
        after: filter.after,
    };
    Ok(manage::list(pool, &listing).await?)
}

/// One job with its attempts and errors, `None` if the ledger has no such job.
pub async fn get_job(pool: &PgPool, id: i64) -> Result<Option<Job>, AdminError> {
    match manage::get(pool, id).await {
        Err(manage::ManageError::Refused(Refusal::NotFound(_))) => Ok(None),
        other => Ok(Some(other?)),
    }
}

/// Make a job available to run now (see [`manage::retry`]).
pub async fn retry_job(pool: &PgPool, id: i64) -> Result<Job, AdminError> {
    Ok(manage::retry(pool, id).await?)
}

/// The jobs a bulk retry of `state` (of `kind` and `environment`, if given) takes.
pub fn matching(
    state: StateFilter,
    kind: Option<&str>,
    environment: Option<uuid::Uuid>,
) -> manage::Matching {
    manage::Matching {
        states: state.states(),
        kind: kind.map(str::to_string),
        environment,
    }
}

/// Retry every job of `m`; jobs whose unique key a live job holds are skipped. Returns the
/// ids retried.
pub async fn retry_jobs(pool: &PgPool, m: &manage::Matching) -> Result<Vec<i64>, sqlx::Error> {
    manage::retry_matching(pool, m).await
}

/// How many jobs [`retry_jobs`] would look at.
pub async fn count_retryable(pool: &PgPool, m: &manage::Matching) -> Result<i64, sqlx::Error> {
    manage::count_matching(pool, m).await
}

/// Cancel a job that is not final (see [`manage::cancel`]).
pub async fn cancel_job(pool: &PgPool, id: i64) -> Result<Job, AdminError> {
    Ok(manage::cancel(pool, id).await?)
}

/// One message of the dead-letter queue.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub reason: String,
    pub dead_at: Option<String>,
    /// The job it names (from its headers, or from its body if that parses).
    pub job_id: Option<i64>,
    pub kind: Option<String>,
    pub attempts: Option<i32>,
    /// That job's state in the ledger now, if it has the job.
    pub ledger_state: Option<String>,
    /// The body, as JSON if it is JSON, else as (lossy) text.
    pub body: Value,
}

/// Take up to `limit` dead letters off the queue without acknowledging them. The caller
/// acknowledges what it is done with; closing the channel puts the rest back.
async fn take_dead(
    channel: &Channel,
    topology: &Topology,
    pool: &PgPool,
    limit: usize,
) -> Result<Vec<(lapin::message::Delivery, DeadLetter)>, AdminError> {
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(m) = channel
            .basic_get(
                topology.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        let delivery = m.delivery;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let h = headers.inner();
        let parsed = JobMessage::parse(&delivery.data).ok();
        let job_id = h
            .get(JOB_ID_HEADER)
            .and_then(header_int)
            .or(parsed.as_ref().map(|m| m.id));
        let ledger_state = match job_id {
            Some(id) => manage::states_of(pool, &[id])
                .await?
                .pop()
                .map(|(_, state)| state),
            None => None,
        };
        let body = serde_json::from_slice(&delivery.data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&delivery.data).into()));
        let letter = DeadLetter {
            // The worker says why; a message the broker dead-lettered (a quorum queue's
            // delivery limit) carries the broker's reason instead.
            reason: h
                .get(REASON_HEADER)
                .and_then(header_text)
                .or_else(|| {
                    h.get("x-first-death-reason")
                        .and_then(header_text)
                        .map(|r| format!("broker: {r}"))
                })
                .unwrap_or_else(|| "(no reason)".into()),
            dead_at: h.get(DEAD_AT_HEADER).and_then(header_text),
            job_id,
            kind: h
                .get(KIND_HEADER)
                .and_then(header_text)
                .or(parsed.as_ref().map(|m| m.kind.clone())),
            attempts: h
                .get(ATTEMPTS_HEADER)
                .and_then(header_int)
                .map(|a| a as i32),
            ledger_state,
            body,
        };
        out.push((delivery, letter));
    }
    Ok(out)
}

/// What sits in the dead-letter queue (up to `limit`), left where it is.
pub async fn dead_letters(
    conn: &lapin::Connection,
    topology: &Topology,
    pool: &PgPool,
    limit: usize,
) -> Result<Vec<DeadLetter>, AdminError> {
    let channel = conn.create_channel().await?;
    let taken = take_dead(&channel, topology, pool, limit).await?;
    // Unacknowledged: closing the channel returns every message to the queue.
    let _ = channel.close(200, "peek done".into()).await;
    Ok(taken.into_iter().map(|(_, l)| l).collect())
}

/// The outcome of a replay.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    /// Jobs made available again; their dead letters are removed.
    pub retried: Vec<i64>,
    /// Jobs that needed nothing (already completed, or back in play): their dead letters
    /// are removed.
    pub cleared: Vec<i64>,
    /// Dead letters left in the queue, with why.
    pub kept: Vec<(Option<i64>, String)>,
}

/// Replay the dead-letter queue (up to `limit` messages): each message naming a job of the
/// ledger that is discarded (or cancelled) has its job retried (see [`retry_job`]) and is
/// removed; one whose job is completed or already back in play is removed; a message naming
/// no job (garbage, an unknown kind) or one whose job cannot be retried stays, and the
/// report says why.
pub async fn replay_dead(
    conn: &lapin::Connection,
    topology: &Topology,
    pool: &PgPool,
    limit: usize,
) -> Result<Replay, AdminError> {
    let channel = conn.create_channel().await?;
    let taken = take_dead(&channel, topology, pool, limit).await?;
    let mut report = Replay::default();
    for (delivery, letter) in taken {
        let Some(id) = letter.job_id.filter(|_| letter.ledger_state.is_some()) else {
            report
                .kept
                .push((letter.job_id, format!("names no job: {}", letter.reason)));
            continue;
        };
        let final_failure = matches!(
            letter.ledger_state.as_deref(),
            Some("discarded") | Some("cancelled")
        );
        if !final_failure {
            delivery.ack(BasicAckOptions::default()).await?;
            report.cleared.push(id);
            continue;
        }
        match retry_job(pool, id).await {
            Ok(_) => {
                delivery.ack(BasicAckOptions::default()).await?;
                report.retried.push(id);
            }
            Err(e) => report.kept.push((Some(id), e.to_string())),
        }
    }
    let _ = channel.close(200, "replay done".into()).await;
    Ok(report)
}

/// What a replay did, a line each.
pub fn replay_summary(report: &Replay) -> String {
    let mut out = format!(
        "retried {} job(s): {:?}\ncleared {} letter(s) of jobs that need nothing: {:?}\n",
        report.retried.len(),
        report.retried,
        report.cleared.len(),
        report.cleared
    );
    for (id, why) in &report.kept {
        let id = id.map(|i| i.to_string()).unwrap_or_else(|| "-".into());
        out.push_str(&format!("kept {id}: {why}\n"));
    }
    out
}

/// Jobs as a table, one line each.
pub fn jobs_table(jobs: &[Job]) -> String {
    let mut out = format!(
        "{:>10}  {:<24}  {:<8}  {:<10}  {:>3}  {:>7}  {:<24}  {}\n",
        "ID", "KIND", "QUEUE", "STATE", "PRI", "ATTEMPT", "RUN AT", "LAST ERROR"
    );
    for j in jobs {
        let last_error = j.last_error().unwrap_or("");
        out.push_str(&format!(
            "{:>10}  {:<24}  {:<8}  {:<10}  {:>3}  {:>7}  {:<24}  {}\n",
            j.id,
            j.kind.as_str(),
            j.queue,
            j.state.as_str(),
            j.priority as i16,
            format!("{}/{}", j.attempt, j.max_attempts),
            iso(j.run_at),
            last_error.chars().take(60).collect::<String>()
        ));
    }
    out
}

/// An environment's events as a table, one line each.
pub fn events_table(events: &[crate::events::list::ListedEvent]) -> String {
    let mut out = format!(
        "{:<36}  {:<32}  {:<10}  {:<24}  {:<24}  {}\n",
        "ID", "NAME", "STATE", "TIMESTAMP", "DELIVER AT", "SOURCE"
    );
    let cut = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    for e in events {
        out.push_str(&format!(
            "{:<36}  {:<32}  {:<10}  {:<24}  {:<24}  {}\n",
            cut(&e.log.id, 36),
            cut(&e.log.name, 32),
            e.state.as_str(),
            e.log.timestamp,
            e.log.deliver_at,
            cut(&e.source, 40)
        ));
    }
    out
}

/// One job in full, with its errors.
pub fn job_details(j: &Job) -> String {
    let mut out = String::new();
    let opt = |t: Option<DateTime<Utc>>| t.map(iso).unwrap_or_else(|| "-".into());
    out.push_str(&format!("id:           {}\n", j.id));
    out.push_str(&format!("kind:         {}\n", j.kind.as_str()));
    out.push_str(&format!("queue:        {}\n", j.queue));
    out.push_str(&format!("state:        {}\n", j.state.as_str()));
    out.push_str(&format!("priority:     {}\n", j.priority as i16));
    out.push_str(&format!("attempt:      {}/{}\n", j.attempt, j.max_attempts));
    out.push_str(&format!("args:         {}\n", j.args.to_value()));
    out.push_str(&format!("created at:   {}\n", iso(j.created_at)));
    out.push_str(&format!("run at:       {}\n", iso(j.run_at)));
    out.push_str(&format!("attempted at: {}\n", opt(j.attempted_at)));
    out.push_str(&format!("finalized at: {}\n", opt(j.finalized_at)));
    out.push_str(&format!("published at: {}\n", opt(j.published_at)));
    let errors = j.errors.as_array().cloned().unwrap_or_default();
    out.push_str(&format!("errors:       {}\n", errors.len()));
    for e in errors {
        out.push_str(&format!(
            "  attempt {} at {} ({}): {}\n",
            e.get("attempt").unwrap_or(&Value::Null),
            e.get("at").and_then(Value::as_str).unwrap_or("?"),
            e.get("kind").and_then(Value::as_str).unwrap_or("?"),
            e.get("error").and_then(Value::as_str).unwrap_or("?"),
        ));
    }
    out
}

/// Dead letters as a table.
pub fn dead_table(letters: &[DeadLetter]) -> String {
    let mut out = format!(
        "{:>10}  {:<24}  {:>8}  {:<10}  {:<24}  {}\n",
        "JOB", "KIND", "ATTEMPTS", "LEDGER", "DEAD AT", "REASON"
    );
    for l in letters {
        out.push_str(&format!(
            "{:>10}  {:<24}  {:>8}  {:<10}  {:<24}  {}\n",
            l.job_id
                .map(|i| i.to_string())
                .unwrap_or_else(|| "-".into()),
            l.kind.as_deref().unwrap_or("-"),
            l.attempts
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            l.ledger_state.as_deref().unwrap_or("-"),
            l.dead_at.as_deref().unwrap_or("-"),
            l.reason
        ));
    }
    out
}

/// What deleting an environment removed.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct EnvironmentDeleted {
    pub id: uuid::Uuid,
    pub events: u64,
    pub runs: u64,
    pub jobs_cancelled: u64,
}

/// Delete the environment at `path` and its data: its jobs not yet final are cancelled and
/// its events and runs deleted in batches of `batch` while it still exists (so a deletion
/// stopped part way is finished by running it again), then its row (with its API key and
/// what cascades), then, once the key cache has forgotten the key, whatever arrived
/// meanwhile. `None`: no such environment.
pub async fn delete_environment(
    pool: &PgPool,
    path: &str,
    batch: i64,
) -> anyhow::Result<Option<EnvironmentDeleted>> {
    use crate::tenants;
    let Some(id) = tenants::id_of(pool, path).await? else {
        return Ok(None);
    };
    let mut deleted = purge(pool, id, batch).await?;
    tenants::delete(pool, id).await?;
    tokio::time::sleep(tenants::KEY_CACHE_TTL + std::time::Duration::from_millis(100)).await;
    let late = purge(pool, id, batch).await?;
    deleted.events += late.events;
    deleted.runs += late.runs;
    deleted.jobs_cancelled += late.jobs_cancelled;
    Ok(Some(deleted))
}

async fn purge(pool: &PgPool, id: uuid::Uuid, batch: i64) -> anyhow::Result<EnvironmentDeleted> {
    let jobs_cancelled = manage::cancel_environment(pool, id).await?;
    let gone = crate::events::retention::delete_environment_events(pool, id, batch).await?;
    Ok(EnvironmentDeleted {
        id,
        events: gone.events,
        runs: gone.runs,
        jobs_cancelled,
    })
}
