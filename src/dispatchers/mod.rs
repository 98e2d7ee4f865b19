//! Dispatchers: what events reach. Registering jobs with an event trigger, dynamic
//! triggers and EPHEMERAL webhooks (here), and every later change of a dispatcher's state
//! ([`state`]: matched, fired, its webhook attempted, delivered or failed, deleted once
//! spent). The only module that names `event_dispatchers`, `webhook_attempts`, `jobs`,
//! `job_versions`, `dynamic_triggers` and `dynamic_trigger_jobs` (checked by
//! `tests/it/structure.rs`).
//!
//! Every registration upserts one dispatcher per owner (a job, or a dynamic trigger's
//! registration key) in the environment, so registering again updates it in place.

pub mod state;

pub use state::{
    Attempt, Candidate, Fired, Toggled, WebhookTarget, candidates, delete_spent, delivered, failed,
    fire, record_attempt, set_dispatcher_enabled, webhook_target,
};

use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::events::filter::{Evaluator, OverBudget};
use crate::tenants::Environment;

/// Which events a dispatcher takes: names, source and filters.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRule {
    pub event_names: Vec<String>,
    pub source: String,
    pub payload_filter: Option<Value>,
    pub context_filter: Option<Value>,
}

/// A version of a job with its event trigger.
#[derive(Debug, Clone)]
pub struct JobRegistration {
    pub version: String,
    pub rule: EventRule,
    pub enabled: bool,
    /// A manual dispatcher is never matched by delivery (trigger.dev's `manual`).
    pub manual: bool,
}

/// What registering a job produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisteredJob {
    pub job_id: Uuid,
    pub slug: String,
    pub version_id: Uuid,
    pub version: String,
    pub dispatcher_id: Uuid,
    pub enabled: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Most event names one rule may list.
pub const MAX_RULE_EVENT_NAMES: usize = 100;
/// Largest payload and context filters of one rule together, serialized as JSON.
pub const MAX_RULE_FILTER_BYTES: usize = 16 * 1024;
/// Most dispatchers one environment may have (jobs and dynamic-trigger registrations).
pub const MAX_DISPATCHERS_PER_ENV: i64 = 1_000;
/// Most versions of one job kept: registering a new one past it removes the oldest (by
/// when they were last registered; the latest is never removed).
pub const MAX_VERSIONS_PER_JOB: i64 = 100;
/// Most dynamic triggers one environment may have.
pub const MAX_DYNAMIC_TRIGGERS_PER_ENV: i64 = 1_000;
/// Most jobs one dynamic trigger may run.
pub const MAX_JOBS_PER_DYNAMIC_TRIGGER: usize = 100;
/// Longest id, key, version, event name or source a registration stores, in characters.
pub const MAX_REGISTERED_CHARS: usize = 255;

/// `what` must be 1 to [`MAX_REGISTERED_CHARS`] characters.
pub fn check_text(what: &str, value: &str) -> Result<(), RegisterError> {
    if value.is_empty() || value.chars().count() > MAX_REGISTERED_CHARS {
        return Err(RegisterError::Invalid(format!(
            "{what} must be 1 to {MAX_REGISTERED_CHARS} characters"
        )));
    }
    Ok(())
}

impl EventRule {
    fn validate(&self) -> Result<(), RegisterError> {
        if self.event_names.is_empty() {
            return Err(RegisterError::Invalid(
                "trigger.event must name at least one event".into(),
            ));
        }
        if self.event_names.len() > MAX_RULE_EVENT_NAMES {
            return Err(RegisterError::Invalid(format!(
                "trigger.event lists at most {MAX_RULE_EVENT_NAMES} event names"
            )));
        }
        for name in &self.event_names {
            check_text("each name in trigger.event", name)?;
        }
        check_text("trigger.source", &self.source)?;
        let mut filter_bytes = 0;
        for (name, f) in [
            ("trigger.payload", &self.payload_filter),
            ("trigger.context", &self.context_filter),
        ] {
            if let Some(f) = f
                && !f.is_null()
            {
                crate::events::filter::validate_filter(f).map_err(|e| {
                    RegisterError::Invalid(format!("{name}{}", e.trim_start_matches('$')))
                })?;
                filter_bytes += crate::events::json_len(f);
            }
        }
        if filter_bytes > MAX_RULE_FILTER_BYTES {
            return Err(RegisterError::Invalid(format!(
                "trigger.payload and trigger.context are {filter_bytes} bytes of JSON together; \
                 at most {MAX_RULE_FILTER_BYTES} are accepted"
            )));
        }
        Ok(())
    }

    fn as_json(&self) -> Value {
        json!({
            "event": self.event_names,
            "source": self.source,
            "payload": self.payload_filter,
            "context": self.context_filter,
        })
    }
}

/// Register a version of a job in an environment, make it the latest, and upsert the job's
/// dispatcher (JOB_VERSION, pointing at this version).
pub async fn register_job(
    pool: &PgPool,
    env: &Environment,
    slug: &str,
    reg: &JobRegistration,
) -> Result<RegisteredJob, RegisterError> {
    check_text("job id", slug)?;
    check_text("version", &reg.version)?;
    reg.rule.validate()?;
    let mut tx = pool.begin().await?;
    let job_id = sqlx::query_scalar!(
        r#"INSERT INTO jobs (id, environment_id, slug) VALUES ($1, $2, $3)
           ON CONFLICT (environment_id, slug) DO UPDATE SET updated_at = now()
           RETURNING id"#,
        Uuid::now_v7(),
        env.id,
        slug
    )
    .fetch_one(&mut *tx)
    .await?;
    let version_id = sqlx::query_scalar!(
        r#"INSERT INTO job_versions (id, job_id, environment_id, version, trigger)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (environment_id, job_id, version) DO UPDATE SET trigger = EXCLUDED.trigger, updated_at = now()
           RETURNING id"#,
        Uuid::now_v7(),
        job_id,
        env.id,
        reg.version,
        reg.rule.as_json()
    )
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query!(
        "UPDATE jobs SET latest_version_id = $2, updated_at = now()
         WHERE environment_id = $3 AND id = $1",
        job_id,
        version_id,
        env.id
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        r#"DELETE FROM job_versions WHERE environment_id = $4 AND id IN (
               SELECT id FROM job_versions WHERE environment_id = $4 AND job_id = $1 AND id <> $2
               ORDER BY updated_at DESC, id DESC
               OFFSET $3)"#,
        job_id,
        version_id,
        MAX_VERSIONS_PER_JOB - 1,
        env.id
    )
    .execute(&mut *tx)
    .await?;
    let dispatcher_id = upsert_dispatcher(
        &mut tx,
        env,
        &reg.rule,
        DispatcherTarget {
            kind: "JOB_VERSION",
            owner: job_id.to_string(),
            target_id: version_id,
        },
        reg.enabled,
        reg.manual,
    )
    .await?;
    tx.commit().await?;
    Ok(RegisteredJob {
        job_id,
        slug: slug.to_string(),
        version_id,
        version: reg.version.clone(),
        dispatcher_id,
        enabled: reg.enabled,
    })
}

/// Create or update a dynamic trigger and set the jobs attached to it (by slug; each must
/// be registered in the environment).
pub async fn register_dynamic_trigger(
    pool: &PgPool,
    env: &Environment,
    slug: &str,
    job_slugs: &[String],
) -> Result<Uuid, RegisterError> {
    check_text("dynamic trigger id", slug)?;
    if job_slugs.len() > MAX_JOBS_PER_DYNAMIC_TRIGGER {
        return Err(RegisterError::Invalid(format!(
            "jobs: a dynamic trigger runs at most {MAX_JOBS_PER_DYNAMIC_TRIGGER} jobs"
        )));
    }
    for job in job_slugs {
        check_text("each id in jobs", job)?;
    }
    let mut tx = pool.begin().await?;
    // Under the environment's registration lock, so two at once cannot both pass the count.
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended('dispatchers:' || $1::uuid::text, 0))",
        env.id
    )
    .execute(&mut *tx)
    .await?;
    let others = sqlx::query_scalar!(
        r#"SELECT count(*) AS "others!" FROM dynamic_triggers
           WHERE environment_id = $1 AND slug <> $2"#,
        env.id,
        slug
    )
    .fetch_one(&mut *tx)
    .await?;
    if others >= MAX_DYNAMIC_TRIGGERS_PER_ENV {
        return Err(RegisterError::Invalid(format!(
            "the environment has {others} dynamic triggers already, the most it may have \
             ({MAX_DYNAMIC_TRIGGERS_PER_ENV})"
        )));
    }
    let trigger_id = sqlx::query_scalar!(
        r#"INSERT INTO dynamic_triggers (id, environment_id, slug) VALUES ($1, $2, $3)
           ON CONFLICT (environment_id, slug) DO UPDATE SET updated_at = now()
           RETURNING id"#,
        Uuid::now_v7(),
        env.id,
        slug
    )
    .fetch_one(&mut *tx)
    .await?;
    let job_ids = sqlx::query_scalar!(
        "SELECT id FROM jobs WHERE environment_id = $1 AND slug = ANY($2)",
        env.id,
        job_slugs
    )
    .fetch_all(&mut *tx)
    .await?;
    let wanted: std::collections::HashSet<&String> = job_slugs.iter().collect();
    if job_ids.len() != wanted.len() {
        return Err(RegisterError::NotFound(
            "one of the attached jobs was".to_string(),
        ));
    }
    sqlx::query!(
        "DELETE FROM dynamic_trigger_jobs WHERE environment_id = $2 AND dynamic_trigger_id = $1",
        trigger_id,
        env.id
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!(
        r#"INSERT INTO dynamic_trigger_jobs (environment_id, dynamic_trigger_id, job_id)
           SELECT $3, $1, j FROM UNNEST($2::uuid[]) AS j"#,
        trigger_id,
        &job_ids,
        env.id
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(trigger_id)
}

/// Register (or update) a dynamic trigger's rule under `key`: a DYNAMIC_TRIGGER dispatcher.
pub async fn register_dynamic_registration(
    pool: &PgPool,
    env: &Environment,
    trigger_slug: &str,
    key: &str,
    rule: &EventRule,
) -> Result<Uuid, RegisterError> {
    check_text("dynamic trigger id", trigger_slug)?;
    check_text("registration key", key)?;
    rule.validate()?;
    let mut tx = pool.begin().await?;
    let trigger_id = sqlx::query_scalar!(
        "SELECT id FROM dynamic_triggers WHERE environment_id = $1 AND slug = $2",
        env.id,
        trigger_slug
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| RegisterError::NotFound(format!("dynamic trigger {trigger_slug:?}")))?;
    let id = upsert_dispatcher(
        &mut tx,
        env,
        rule,
        DispatcherTarget {
            kind: "DYNAMIC_TRIGGER",
            owner: format!("{trigger_id}:{key}"),
            target_id: trigger_id,
        },
        true,
        false,
    )
    .await?;
    tx.commit().await?;
    Ok(id)
}

struct DispatcherTarget {
    kind: &'static str,
    /// What the dispatcher belongs to: unique per environment.
    owner: String,
    target_id: Uuid,
}

/// Insert or update the dispatcher of `target.owner`. A new one is refused when the
/// environment has [`MAX_DISPATCHERS_PER_ENV`] already; registrations of one environment
/// take a transaction-scoped advisory lock first, so two at once cannot both pass the count.
async fn upsert_dispatcher(
    conn: &mut PgConnection,
    env: &Environment,
    rule: &EventRule,
    target: DispatcherTarget,
    enabled: bool,
    manual: bool,
) -> Result<Uuid, RegisterError> {
    make_room(conn, env, &target.owner).await?;
    Ok(sqlx::query_scalar!(
        r#"INSERT INTO event_dispatchers
               (id, environment_id, event_names, source, payload_filter, context_filter,
                enabled, manual, dispatchable_type, dispatchable_id, target_id)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
           ON CONFLICT (environment_id, dispatchable_id) DO UPDATE SET
               event_names = EXCLUDED.event_names, source = EXCLUDED.source,
               payload_filter = EXCLUDED.payload_filter, context_filter = EXCLUDED.context_filter,
               enabled = EXCLUDED.enabled, manual = EXCLUDED.manual,
               dispatchable_type = EXCLUDED.dispatchable_type, target_id = EXCLUDED.target_id,
               updated_at = now()
           RETURNING id"#,
        Uuid::now_v7(),
        env.id,
        &rule.event_names,
        rule.source,
        rule.payload_filter.clone().filter(|v| !v.is_null()),
        rule.context_filter.clone().filter(|v| !v.is_null()),
        enabled,
        manual,
        target.kind,
        target.owner,
        target.target_id
    )
    .fetch_one(conn)
    .await?)
}

/// Refuse a new dispatcher (other than `owner`'s) when the environment has
/// [`MAX_DISPATCHERS_PER_ENV`] live ones already. Registrations of one environment take a
/// transaction-scoped advisory lock first, so two at once cannot both pass the count.
async fn make_room(
    conn: &mut PgConnection,
    env: &Environment,
    owner: &str,
) -> Result<(), RegisterError> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended('dispatchers:' || $1::uuid::text, 0))",
        env.id
    )
    .execute(&mut *conn)
    .await?;
    let counted = sqlx::query_scalar!(
        r#"SELECT count(*) AS "others!" FROM event_dispatchers
           WHERE environment_id = $1 AND dispatchable_id <> $2
             AND NOT (dispatchable_type = 'EPHEMERAL' AND (fired_at IS NOT NULL OR expires_at <= now()))"#,
        env.id,
        owner
    )
    .fetch_one(&mut *conn)
    .await?;
    if counted >= MAX_DISPATCHERS_PER_ENV {
        return Err(RegisterError::Invalid(format!(
            "the environment has {counted} dispatchers already, the most it may have \
             ({MAX_DISPATCHERS_PER_ENV}); delete registrations it no longer needs"
        )));
    }
    Ok(())
}

/// Remove a dynamic trigger's registration (its dispatcher). `false` if there was none.
pub async fn delete_dynamic_registration(
    pool: &PgPool,
    env: &Environment,
    trigger_slug: &str,
    key: &str,
) -> Result<bool, sqlx::Error> {
    let deleted = sqlx::query!(
        r#"DELETE FROM event_dispatchers d
           USING dynamic_triggers t
           WHERE t.environment_id = $1 AND t.slug = $2
             AND d.environment_id = $1 AND d.dispatchable_type = 'DYNAMIC_TRIGGER'
             AND d.dispatchable_id = t.id::text || ':' || $3"#,
        env.id,
        trigger_slug,
        key
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(deleted > 0)
}

/// Most live EPHEMERAL dispatchers (not fired, not expired) one environment may have.
pub const MAX_LIVE_EPHEMERAL_PER_ENV: i64 = 100;
/// Most spent EPHEMERAL dispatchers (delivered, failed, or expired unfired) one
/// environment keeps for their attempts; past it the oldest go as new ones are made.
pub const MAX_SPENT_EPHEMERAL_KEPT: i64 = 1_000;

/// Shortest and longest life of an EPHEMERAL dispatcher, and the default (trigger.dev's).
pub const EPHEMERAL_MIN_SECS: i64 = 10;
pub const EPHEMERAL_MAX_SECS: i64 = 60 * 60 * 24 * 365;
pub const EPHEMERAL_DEFAULT_SECS: i64 = 3_600;

/// An EPHEMERAL dispatcher as its creator sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = EphemeralDispatcher)]
pub struct Ephemeral {
    pub id: Uuid,
    pub url: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// The signing secret (also on a repeated call for the same environment, so a client
    /// whose first answer was lost can still verify).
    pub secret: Option<String>,
    /// `false`: a live dispatcher of this URL existed and is returned as it is.
    pub created: bool,
}

/// Create an EPHEMERAL dispatcher for `url`, live for `timeout_secs`: it POSTs the first
/// event its rule matches to the URL, once. Idempotent on (url, environment): while a
/// dispatcher of the URL is live (not fired, not expired) it is returned unchanged, its
/// rule and expiry as first given (trigger.dev's upsert updates nothing), with its secret;
/// one that fired or expired gives the URL up to a new dispatcher.
pub async fn register_ephemeral(
    pool: &PgPool,
    env: &Environment,
    url: &str,
    rule: &EventRule,
    account: Option<&str>,
    timeout_secs: i64,
) -> Result<Ephemeral, RegisterError> {
    crate::webhooks::check_url(url).map_err(|e| RegisterError::Invalid(e.to_string()))?;
    if !(EPHEMERAL_MIN_SECS..=EPHEMERAL_MAX_SECS).contains(&timeout_secs) {
        return Err(RegisterError::Invalid(format!(
            "timeoutInSeconds must be {EPHEMERAL_MIN_SECS} to {EPHEMERAL_MAX_SECS}"
        )));
    }
    rule.validate()?;
    if let Some(a) = account {
        check_text("accountId", a)?;
    }
    let mut tx = pool.begin().await?;
    // First, as it takes the environment's registration lock: two creations of one URL at
    // once then find each other's dispatcher.
    make_room(&mut tx, env, url).await?;
    let existing = sqlx::query!(
        r#"SELECT id, secret AS "secret!", expires_at AS "expires_at!",
                  (fired_at IS NULL AND expires_at > now()) AS "live!"
           FROM event_dispatchers
           WHERE environment_id = $1 AND dispatchable_id = $2 AND dispatchable_type = 'EPHEMERAL'
           FOR UPDATE"#,
        env.id,
        url
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(e) = &existing {
        if e.live {
            return Ok(Ephemeral {
                id: e.id,
                url: url.to_string(),
                expires_at: e.expires_at,
                secret: Some(e.secret.clone()),
                created: false,
            });
        }
        // Spent: it keeps its attempts, and gives the URL up.
        sqlx::query!(
            "UPDATE event_dispatchers SET dispatchable_id = 'spent:' || id::text, enabled = false, updated_at = now() WHERE id = $1",
            e.id
        )
        .execute(&mut *tx)
        .await?;
    }
    let live = sqlx::query_scalar!(
        r#"SELECT count(*) AS "live!" FROM event_dispatchers
           WHERE environment_id = $1 AND dispatchable_type = 'EPHEMERAL'
             AND fired_at IS NULL AND expires_at > now()"#,
        env.id
    )
    .fetch_one(&mut *tx)
    .await?;
    if live >= MAX_LIVE_EPHEMERAL_PER_ENV {
        return Err(RegisterError::Invalid(format!(
            "the environment has {live} live ephemeral dispatchers, the most it may have \
             ({MAX_LIVE_EPHEMERAL_PER_ENV} live ephemeral dispatchers); wait for one to fire \
             or expire"
        )));
    }
    let account_id = match account {
        Some(identifier) => {
            Some(crate::tenants::external_account(&mut tx, env.id, identifier).await?)
        }
        None => None,
    };
    let id = Uuid::now_v7();
    let secret = crate::webhooks::new_secret();
    let expires_at = sqlx::query_scalar!(
        r#"INSERT INTO event_dispatchers
               (id, environment_id, event_names, source, payload_filter, context_filter,
                enabled, manual, dispatchable_type, dispatchable_id, target_id,
                url, secret, expires_at, external_account_id)
           VALUES ($1, $2, $3, $4, $5, $6, true, false, 'EPHEMERAL', $7, $1,
                   $7, $8, now() + make_interval(secs => $9), $10)
           RETURNING expires_at AS "expires_at!""#,
        id,
        env.id,
        &rule.event_names,
        rule.source,
        rule.payload_filter.clone().filter(|v| !v.is_null()),
        rule.context_filter.clone().filter(|v| !v.is_null()),
        url,
        secret,
        timeout_secs as f64,
        account_id
    )
    .fetch_one(&mut *tx)
    .await?;
    // Spent ones past the most kept go, oldest first (with their attempts); one whose
    // webhook is still being sent stays.
    sqlx::query!(
        r#"DELETE FROM event_dispatchers WHERE id IN (
               SELECT id FROM event_dispatchers
               WHERE environment_id = $1 AND dispatchable_type = 'EPHEMERAL'
                 AND (delivered_at IS NOT NULL OR failed_at IS NOT NULL
                      OR (fired_at IS NULL AND expires_at <= now()))
               ORDER BY created_at DESC, id DESC
               OFFSET $2)"#,
        env.id,
        MAX_SPENT_EPHEMERAL_KEPT
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Ephemeral {
        id,
        url: url.to_string(),
        expires_at,
        secret: Some(secret),
        created: true,
    })
}

/// An EPHEMERAL dispatcher's state, and every attempt of its webhook.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = EphemeralDispatcherState)]
pub struct EphemeralView {
    pub id: Uuid,
    pub url: String,
    pub event: Vec<String>,
    pub source: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub fired_at: Option<chrono::DateTime<chrono::Utc>>,
    pub delivered_at: Option<chrono::DateTime<chrono::Utc>>,
    pub failed_at: Option<chrono::DateTime<chrono::Utc>>,
    /// `waiting`, `expired`, `firing` (fired, not yet answered 2xx), `delivered`, or
    /// `failed` (its webhook job discarded: see the attempts).
    #[schema(value_type = String)]
    pub status: &'static str,
    pub attempts: Vec<WebhookAttempt>,
}

/// One request made (or refused) for an EPHEMERAL dispatcher.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAttempt {
    pub attempt: i32,
    /// The answer's HTTP status; `null` when none came.
    pub status: Option<i32>,
    pub duration_ms: i32,
    pub error: Option<String>,
    pub event_id: Uuid,
    pub at: chrono::DateTime<chrono::Utc>,
}

/// Most attempts one view lists (the newest).
pub const MAX_ATTEMPTS_SHOWN: i64 = 100;

/// The EPHEMERAL dispatcher `id` of the environment, with its attempts.
pub async fn ephemeral(
    pool: &PgPool,
    env: &Environment,
    id: Uuid,
) -> Result<Option<EphemeralView>, sqlx::Error> {
    let Some(d) = sqlx::query!(
        r#"SELECT id, url AS "url!", event_names, source, expires_at AS "expires_at!",
                  fired_at, delivered_at, failed_at, expires_at <= now() AS "expired!"
           FROM event_dispatchers
           WHERE id = $1 AND environment_id = $2 AND dispatchable_type = 'EPHEMERAL'"#,
        id,
        env.id
    )
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let mut attempts = sqlx::query_as!(
        WebhookAttempt,
        r#"SELECT attempt, status, duration_ms, error, event_record_id AS event_id, created_at AS at
           FROM webhook_attempts WHERE dispatcher_id = $1 ORDER BY id DESC LIMIT $2"#,
        id,
        MAX_ATTEMPTS_SHOWN
    )
    .fetch_all(pool)
    .await?;
    attempts.reverse();
    let status = match (d.fired_at, d.delivered_at, d.failed_at) {
        (_, Some(_), _) => "delivered",
        (_, None, Some(_)) => "failed",
        (Some(_), None, None) => "firing",
        (None, None, None) if d.expired => "expired",
        (None, None, None) => "waiting",
    };
    Ok(Some(EphemeralView {
        id: d.id,
        url: d.url,
        event: d.event_names,
        source: d.source,
        expires_at: d.expires_at,
        fired_at: d.fired_at,
        delivered_at: d.delivered_at,
        failed_at: d.failed_at,
        status,
        attempts,
    }))
}

/// A dispatcher as operators and the dry run see it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Dispatcher)]
pub struct DispatcherView {
    pub id: Uuid,
    /// `JOB_VERSION` or `DYNAMIC_TRIGGER`.
    pub dispatchable_type: String,
    /// The job's id (slug), or the dynamic trigger's id (slug) and the registration key.
    pub job: Option<String>,
    pub dynamic_trigger: Option<String>,
    pub key: Option<String>,
    pub event_names: Vec<String>,
    pub source: String,
    pub payload: Option<Value>,
    pub context: Option<Value>,
    pub enabled: bool,
    pub manual: bool,
    /// EPHEMERAL: its URL, and when it expires (or expired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip)]
    pub external_account_id: Option<Uuid>,
}

/// Most dispatchers one page of a listing holds.
pub const MAX_DISPATCHER_PAGE: i64 = 500;

/// A dispatcher's row as the listing and the dry run read it.
struct DispatcherRow {
    id: Uuid,
    dispatchable_type: String,
    dispatchable_id: String,
    event_names: Vec<String>,
    source: String,
    payload_filter: Option<Value>,
    context_filter: Option<Value>,
    enabled: bool,
    manual: bool,
    external_account_id: Option<Uuid>,
    url: Option<String>,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    job_slug: Option<String>,
    trigger_slug: Option<String>,
}

impl From<DispatcherRow> for DispatcherView {
    fn from(r: DispatcherRow) -> Self {
        DispatcherView {
            id: r.id,
            key: (r.dispatchable_type == "DYNAMIC_TRIGGER")
                .then(|| {
                    r.dispatchable_id
                        .split_once(':')
                        .map(|(_, k)| k.to_string())
                })
                .flatten(),
            dispatchable_type: r.dispatchable_type,
            job: r.job_slug,
            dynamic_trigger: r.trigger_slug,
            event_names: r.event_names,
            source: r.source,
            payload: r.payload_filter,
            context: r.context_filter,
            enabled: r.enabled,
            manual: r.manual,
            url: r.url,
            expires_at: r.expires_at,
            external_account_id: r.external_account_id,
        }
    }
}

/// A page of the environment's dispatchers, oldest first: at most `limit` (1 to
/// [`MAX_DISPATCHER_PAGE`]) after the dispatcher `after`, and the id to pass as `after` for
/// the next page when there is one.
pub async fn list_dispatchers(
    pool: &PgPool,
    env: &Environment,
    after: Option<Uuid>,
    limit: i64,
) -> Result<(Vec<DispatcherView>, Option<Uuid>), sqlx::Error> {
    let limit = limit.clamp(1, MAX_DISPATCHER_PAGE);
    // Ids are UUIDv7: their order is their creation order.
    let rows = sqlx::query_as!(
        DispatcherRow,
        r#"SELECT d.id, d.dispatchable_type, d.dispatchable_id, d.event_names, d.source,
                  d.payload_filter, d.context_filter, d.enabled, d.manual, d.external_account_id,
                  d.url, d.expires_at,
                  j.slug AS "job_slug?", t.slug AS "trigger_slug?"
           FROM event_dispatchers d
           LEFT JOIN job_versions v ON d.dispatchable_type = 'JOB_VERSION'
                AND v.environment_id = d.environment_id AND v.id = d.target_id
           LEFT JOIN jobs j ON j.environment_id = v.environment_id AND j.id = v.job_id
           LEFT JOIN dynamic_triggers t ON d.dispatchable_type = 'DYNAMIC_TRIGGER'
                AND t.environment_id = d.environment_id AND t.id = d.target_id
           WHERE d.environment_id = $1 AND ($2::uuid IS NULL OR d.id > $2)
           ORDER BY d.id
           LIMIT $3"#,
        env.id,
        after,
        limit + 1
    )
    .fetch_all(pool)
    .await?;
    let mut page: Vec<DispatcherView> = rows.into_iter().map(DispatcherView::from).collect();
    let next = if page.len() as i64 > limit {
        page.truncate(limit as usize);
        page.last().map(|d| d.id)
    } else {
        None
    };
    Ok((page, next))
}

/// The dispatchers of the environment a dry run of an event named `name` looks at, oldest
/// first: those whose rule lists the name and that could take an event (what delivery
/// reads), the disabled and manual ones among them (to say why not), and the newest
/// [`MAX_EXPIRED_SHOWN`] EPHEMERAL ones of the name that expired unfired. Spent EPHEMERAL
/// ones and those of other names are not read.
pub async fn dispatchers_for_event(
    pool: &PgPool,
    env: &Environment,
    name: &str,
) -> Result<Vec<DispatcherView>, sqlx::Error> {
    let rows = sqlx::query_as!(
        DispatcherRow,
        r#"SELECT d.id AS "id!", d.dispatchable_type AS "dispatchable_type!",
                  d.dispatchable_id AS "dispatchable_id!", d.event_names AS "event_names!",
                  d.source AS "source!", d.payload_filter, d.context_filter,
                  d.enabled AS "enabled!", d.manual AS "manual!", d.external_account_id,
                  d.url, d.expires_at, j.job_slug AS "job_slug?", t.trigger_slug AS "trigger_slug?"
           FROM (
               (SELECT d.*, 0 AS part FROM event_dispatchers d
                WHERE d.environment_id = $1 AND d.event_names @> ARRAY[$2::text]
                  AND (d.dispatchable_type <> 'EPHEMERAL'
                       OR (d.fired_at IS NULL AND d.expires_at > now())))
               UNION ALL
               (SELECT d.*, 1 AS part FROM event_dispatchers d
                WHERE d.environment_id = $1 AND d.event_names @> ARRAY[$2::text]
                  AND d.dispatchable_type = 'EPHEMERAL'
                  AND d.fired_at IS NULL AND d.expires_at <= now()
                ORDER BY d.expires_at DESC
                LIMIT $3)
           ) d
           LEFT JOIN LATERAL (
               SELECT j.slug AS job_slug FROM job_versions v
               JOIN jobs j ON j.environment_id = v.environment_id AND j.id = v.job_id
               WHERE d.dispatchable_type = 'JOB_VERSION' AND v.environment_id = d.environment_id
                 AND v.id = d.target_id) j ON true
           LEFT JOIN LATERAL (
               SELECT t.slug AS trigger_slug FROM dynamic_triggers t
               WHERE d.dispatchable_type = 'DYNAMIC_TRIGGER' AND t.environment_id = d.environment_id
                 AND t.id = d.target_id) t ON true
           ORDER BY d.id"#,
        env.id,
        name,
        MAX_EXPIRED_SHOWN
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(DispatcherView::from).collect())
}

/// Most EPHEMERAL dispatchers that expired unfired a dry run shows (the newest).
pub const MAX_EXPIRED_SHOWN: i64 = 100;

/// What delivery knows of an event when it picks dispatchers.
#[derive(Debug, Clone, Copy)]
pub struct EventFacts<'a> {
    pub name: &'a str,
    pub source: &'a str,
    pub account: Option<Uuid>,
    pub payload_type: &'a str,
    pub payload: &'a Value,
    pub context: &'a Value,
}

/// The rule of an enabled, non-manual dispatcher, as delivery checks it.
#[derive(Debug, Clone, Copy)]
pub struct RuleRef<'a> {
    pub event_names: &'a [String],
    pub source: &'a str,
    pub account: Option<Uuid>,
    pub payload_filter: Option<&'a Value>,
    pub context_filter: Option<&'a Value>,
}

/// Why a rule does not take an event; only a filter failure carries text (its path), so
/// checking allocates nothing for the common misses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    Name,
    Source,
    Account,
    Filter(String),
}

/// The one place that says whether a dispatcher's rule takes an event: delivery
/// (`handlers::deliver_event`) and the dry run (`why_not`) both ask here. Filters are evaluated
/// by `eval`, whose step budget is the event's, across all the rules it is checked against.
pub fn rule_miss(
    eval: &mut Evaluator,
    rule: RuleRef<'_>,
    e: EventFacts<'_>,
) -> Result<Option<Miss>, OverBudget> {
    if !rule.event_names.iter().any(|n| n == e.name) {
        return Ok(Some(Miss::Name));
    }
    if rule.source != e.source {
        return Ok(Some(Miss::Source));
    }
    if rule.account.is_some() && rule.account != e.account {
        return Ok(Some(Miss::Account));
    }
    Ok(eval
        .dispatcher_mismatch(
            rule.payload_filter,
            rule.context_filter,
            e.payload_type,
            e.payload,
            e.context,
        )?
        .map(Miss::Filter))
}

/// What a dry run found: the dispatchers that would take an event and those that would not,
/// with why (at most `listed` of each), their counts, and the filter steps it took.
#[derive(Debug, Default)]
pub struct DryRun {
    pub matches: Vec<DispatcherView>,
    pub misses: Vec<(DispatcherView, String)>,
    pub match_count: usize,
    pub miss_count: usize,
    pub steps: u64,
}

/// Check an event against `dispatchers` as delivery would ([`why_not`]), with one step
/// budget for the event. CPU work: call it off the async threads.
pub fn dry_run(dispatchers: Vec<DispatcherView>, e: EventFacts<'_>, listed: usize) -> DryRun {
    let mut eval = Evaluator::default();
    let mut run = DryRun::default();
    for d in dispatchers {
        match why_not(&mut eval, &d, e) {
            None => {
                run.match_count += 1;
                if run.matches.len() < listed {
                    run.matches.push(d);
                }
            }
            Some(reason) => {
                run.miss_count += 1;
                if run.misses.len() < listed {
                    run.misses.push((d, reason));
                }
            }
        }
    }
    run.steps = eval.steps();
    run
}

/// Why a dispatcher would not take an event: the first reason, in the order delivery
/// checks. The reasons do not repeat the event or the rule: the dry run shows both.
pub fn why_not(eval: &mut Evaluator, d: &DispatcherView, e: EventFacts<'_>) -> Option<String> {
    if !d.enabled {
        return Some("disabled".into());
    }
    if d.manual {
        return Some("manual: only run by hand".into());
    }
    if d.expires_at.is_some_and(|at| at <= chrono::Utc::now()) {
        return Some("expired".into());
    }
    let rule = RuleRef {
        event_names: &d.event_names,
        source: &d.source,
        account: d.external_account_id,
        payload_filter: d.payload.as_ref(),
        context_filter: d.context.as_ref(),
    };
    match rule_miss(eval, rule, e) {
        Ok(None) => None,
        Ok(Some(Miss::Name)) => Some("event name is not one of eventNames".into()),
        Ok(Some(Miss::Source)) => Some("source is not the dispatcher's source".into()),
        Ok(Some(Miss::Account)) => Some("bound to another account".into()),
        Ok(Some(Miss::Filter(path))) => Some(format!("filter failed at {path}")),
        Err(over) => Some(over.to_string()),
    }
}
