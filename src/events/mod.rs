//! Events: ingest, lookup, and the filters that decide which dispatchers an event reaches.

pub mod filter;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::db::environments::Environment;
use crate::queue::{DeliverEventArgs, InsertOpts, JobInsertResult, QueueService};

/// Source given to events that name none.
pub const DEFAULT_SOURCE: &str = "trigger.dev";

/// An event as a producer sends it.
#[derive(Debug, Clone, Default)]
pub struct SendEvent {
    /// The producer's id, unique per environment; generated when absent.
    pub id: Option<String>,
    pub name: String,
    pub payload: Value,
    pub context: Option<Value>,
    pub timestamp: Option<DateTime<Utc>>,
    pub source: Option<String>,
}

/// When and for whom to deliver it.
#[derive(Debug, Clone, Default)]
pub struct SendEventOptions {
    /// Deliver at this time; wins over `deliver_after`.
    pub deliver_at: Option<DateTime<Utc>>,
    /// Deliver this many seconds from now.
    pub deliver_after: Option<u64>,
    /// Ties the event to an external account of the environment.
    pub account_id: Option<String>,
}

/// A stored event (trigger.dev's EventRecord).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub id: Uuid,
    pub environment_id: Uuid,
    pub event_id: String,
    pub name: String,
    pub source: String,
    pub payload: Value,
    pub context: Value,
    pub timestamp: DateTime<Utc>,
    pub deliver_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    pub external_account_id: Option<Uuid>,
    pub is_test: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What ingest did.
#[derive(Debug, Clone)]
pub struct IngestResult {
    pub record: EventRecord,
    /// False when the environment already had an event with this id: nothing was written.
    pub created: bool,
    /// The `deliverEvent` job, when one was enqueued.
    pub job: Option<JobInsertResult>,
}

/// A run created for an event, as the event lookup shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub id: Uuid,
    pub status: String,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Ingest and lookup of events.
#[derive(Debug, Clone)]
pub struct EventsService {
    pool: PgPool,
    queue: QueueService,
}

impl EventsService {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            queue: QueueService::new(),
        }
    }

    /// Store the event and enqueue its `deliverEvent` job in one transaction. An event id
    /// the environment already has returns the stored event and writes nothing.
    pub async fn ingest_send_event(
        &self,
        env: &Environment,
        request: SendEvent,
        options: SendEventOptions,
    ) -> Result<IngestResult, IngestError> {
        let mut tx = self.pool.begin().await?;
        let result = self
            .ingest_in_tx(&mut tx, env, request, options, false)
            .await?;
        tx.commit().await?;
        Ok(result)
    }

    /// Ingest inside the caller's transaction, so the event commits with the caller's work.
    pub async fn ingest_in_tx(
        &self,
        tx: &mut PgConnection,
        env: &Environment,
        request: SendEvent,
        options: SendEventOptions,
        is_test: bool,
    ) -> Result<IngestResult, IngestError> {
        if request.name.is_empty() {
            return Err(IngestError::Invalid("event.name must not be empty".into()));
        }
        let event_id = request
            .id
            .unwrap_or_else(|| Uuid::now_v7().simple().to_string());
        let account = match options.account_id {
            Some(identifier) => Some(upsert_external_account(tx, env.id, &identifier).await?),
            None => None,
        };
        let deliver_after = options
            .deliver_after
            .filter(|_| options.deliver_at.is_none())
            .map(|s| s as f64);

        let inserted = sqlx::query_as!(
            EventRecord,
            r#"INSERT INTO event_records
                   (id, environment_id, event_id, name, source, payload, context, timestamp,
                    deliver_at, external_account_id, is_test)
               VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, now()),
                       COALESCE($9, now() + make_interval(secs => COALESCE($10::float8, 0))), $11, $12)
               ON CONFLICT (environment_id, event_id) DO NOTHING
               RETURNING id, environment_id, event_id, name, source, payload, context, timestamp,
                         deliver_at, delivered_at, cancelled_at, external_account_id, is_test,
                         created_at, updated_at"#,
            Uuid::now_v7(),
            env.id,
            event_id,
            request.name,
            request.source.as_deref().unwrap_or(DEFAULT_SOURCE),
            request.payload,
            request.context.unwrap_or(Value::Null),
            request.timestamp,
            options.deliver_at,
            deliver_after,
            account,
            is_test,
        )
        .fetch_optional(&mut *tx)
        .await?;

        let Some(record) = inserted else {
            let record = find_event(tx, env.id, &event_id).await?.ok_or_else(|| {
                IngestError::Invalid(format!("event {event_id:?} conflicted but is gone"))
            })?;
            return Ok(IngestResult {
                record,
                created: false,
                job: None,
            });
        };

        let job = self
            .queue
            .enqueue_deliver_event(
                tx,
                DeliverEventArgs { id: record.id },
                InsertOpts {
                    run_at: Some(record.deliver_at),
                    ..InsertOpts::default()
                },
            )
            .await?;
        Ok(IngestResult {
            record,
            created: true,
            job: Some(job),
        })
    }

    /// An event of the environment by the producer's id, with its runs.
    pub async fn get_event(
        &self,
        env: &Environment,
        event_id: &str,
    ) -> Result<Option<(EventRecord, Vec<RunSummary>)>, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let Some(record) = find_event(&mut conn, env.id, event_id).await? else {
            return Ok(None);
        };
        let runs = sqlx::query_as!(
            RunSummary,
            r#"SELECT id, status, started_at, completed_at FROM job_runs
               WHERE event_record_id = $1 AND environment_id = $2
               ORDER BY created_at, id"#,
            record.id,
            env.id
        )
        .fetch_all(&mut *conn)
        .await?;
        Ok(Some((record, runs)))
    }
}

/// Find an event by the producer's id within one environment.
pub async fn find_event(
    conn: &mut PgConnection,
    environment_id: Uuid,
    event_id: &str,
) -> Result<Option<EventRecord>, sqlx::Error> {
    sqlx::query_as!(
        EventRecord,
        r#"SELECT id, environment_id, event_id, name, source, payload, context, timestamp,
                  deliver_at, delivered_at, cancelled_at, external_account_id, is_test,
                  created_at, updated_at
           FROM event_records WHERE environment_id = $1 AND event_id = $2"#,
        environment_id,
        event_id
    )
    .fetch_optional(conn)
    .await
}

async fn upsert_external_account(
    conn: &mut PgConnection,
    environment_id: Uuid,
    identifier: &str,
) -> Result<Uuid, sqlx::Error> {
    sqlx::query_scalar!(
        r#"INSERT INTO external_accounts (id, environment_id, identifier) VALUES ($1, $2, $3)
           ON CONFLICT (environment_id, identifier) DO UPDATE SET identifier = EXCLUDED.identifier
           RETURNING id"#,
        Uuid::now_v7(),
        environment_id,
        identifier
    )
    .fetch_one(conn)
    .await
}
