//! Organizations, projects, environments and their API keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The kinds of environment trigger.dev knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EnvironmentType {
    Development,
    Production,
    Staging,
    Preview,
}

impl EnvironmentType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Development => "DEVELOPMENT",
            Self::Production => "PRODUCTION",
            Self::Staging => "STAGING",
            Self::Preview => "PREVIEW",
        }
    }
}

/// The environment an API key belongs to: the scope of every API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub id: Uuid,
    pub slug: String,
    pub env_type: String,
    pub project_id: Uuid,
    /// Its ingest rate limit over HTTP, in events per second (`None`: no limit).
    pub max_events_per_second: Option<i32>,
}

/// What `env create` made.
#[derive(Debug, Clone)]
pub struct CreatedEnvironment {
    pub environment: Environment,
    /// The API key in clear; shown once, stored only as a hash.
    pub api_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvironmentError {
    #[error("expected <org>/<project>/<env>, each of letters, digits, '-' or '_': got {0:?}")]
    BadPath(String),
    #[error("a limit must be at least 1 (or none, for no limit): got {0}")]
    BadLimit(i32),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// SHA-256 of an API key, as stored.
pub fn hash_api_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// A new key of the form `tr_<env>_<32 alphanumerics>`.
pub fn generate_api_key(env_slug: &str) -> String {
    let tag: String = env_slug
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    let secret: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    format!("tr_{tag}_{secret}")
}

fn valid_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// How much of the service an environment may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Due jobs of each kind published and not yet final; `None`: no limit (see the
    /// ledger's fair claim).
    pub max_jobs_in_flight: Option<i32>,
    /// Events accepted per second over HTTP; `None`: no limit.
    pub max_events_per_second: Option<i32>,
}

/// Changes to [`Limits`]: `Some(None)` lifts a limit, `None` leaves it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetLimits {
    pub max_jobs_in_flight: Option<Option<i32>>,
    pub max_events_per_second: Option<Option<i32>>,
}

/// The slugs of `org/project/env`, checked.
fn slugs(path: &str) -> Result<[&str; 3], EnvironmentError> {
    let parts: Vec<&str> = path.split('/').collect();
    match parts[..] {
        [org, project, env] if [org, project, env].iter().all(|s| valid_slug(s)) => {
            Ok([org, project, env])
        }
        _ => Err(EnvironmentError::BadPath(path.to_string())),
    }
}

/// The id of the environment at `path`, `None` for no such environment.
pub async fn id_of(pool: &PgPool, path: &str) -> Result<Option<Uuid>, EnvironmentError> {
    let [org, project, env] = slugs(path)?;
    Ok(sqlx::query_scalar!(
        r#"SELECT e.id FROM runtime_environments e
           JOIN projects p ON p.id = e.project_id
           JOIN organizations o ON o.id = p.organization_id
           WHERE o.slug = $1 AND p.slug = $2 AND e.slug = $3"#,
        org,
        project,
        env
    )
    .fetch_optional(pool)
    .await?)
}

/// The `org/project/env` path of each of these environments that exists.
pub async fn paths(pool: &PgPool, ids: &[Uuid]) -> Result<HashMap<Uuid, String>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT e.id, o.slug || '/' || p.slug || '/' || e.slug AS "path!"
           FROM runtime_environments e
           JOIN projects p ON p.id = e.project_id
           JOIN organizations o ON o.id = p.organization_id
           WHERE e.id = ANY($1)"#,
        ids
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.path)).collect())
}

/// An environment as the console lists it: its path, type and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvironmentListing {
    pub id: Uuid,
    pub path: String,
    pub slug: String,
    pub env_type: String,
    pub project_id: Uuid,
    pub max_jobs_in_flight: Option<i32>,
    pub max_events_per_second: Option<i32>,
}

impl EnvironmentListing {
    /// The environment, as an API key's caller gets it.
    pub fn environment(&self) -> Environment {
        Environment {
            id: self.id,
            slug: self.slug.clone(),
            env_type: self.env_type.clone(),
            project_id: self.project_id,
            max_events_per_second: self.max_events_per_second,
        }
    }
}

/// Every environment, by path.
pub async fn listing(pool: &PgPool) -> Result<Vec<EnvironmentListing>, sqlx::Error> {
    sqlx::query_as!(
        EnvironmentListing,
        r#"SELECT e.id, o.slug || '/' || p.slug || '/' || e.slug AS "path!", e.slug,
                  e.type AS env_type, e.project_id, e.max_jobs_in_flight,
                  e.max_events_per_second
           FROM runtime_environments e
           JOIN projects p ON p.id = e.project_id
           JOIN organizations o ON o.id = p.organization_id
           ORDER BY 2"#
    )
    .fetch_all(pool)
    .await
}

/// Delete the environment `id`'s row, with what cascades from it (jobs, versions,
/// dispatchers, dynamic triggers, external accounts; its API key is in the row). Its events,
/// runs and queued jobs carry no foreign key: see `admin::delete_environment`.
pub async fn delete(pool: &PgPool, id: Uuid) -> Result<(), EnvironmentError> {
    sqlx::query!("DELETE FROM runtime_environments WHERE id = $1", id)
        .execute(pool)
        .await?;
    Ok(())
}

/// The limits of the environment at `path` (`None`: no such environment), after applying
/// `set`.
pub async fn limits(
    pool: &PgPool,
    path: &str,
    set: SetLimits,
) -> Result<Option<Limits>, EnvironmentError> {
    let [org, project, env] = slugs(path)?;
    for n in [set.max_jobs_in_flight, set.max_events_per_second]
        .into_iter()
        .flatten()
        .flatten()
    {
        if n < 1 {
            return Err(EnvironmentError::BadLimit(n));
        }
    }
    let changes = set.max_jobs_in_flight.is_some() || set.max_events_per_second.is_some();
    let row = sqlx::query!(
        r#"UPDATE runtime_environments e
           SET max_jobs_in_flight = CASE WHEN $4 THEN $5 ELSE e.max_jobs_in_flight END,
               max_events_per_second = CASE WHEN $6 THEN $7 ELSE e.max_events_per_second END,
               updated_at = CASE WHEN $8 THEN now() ELSE e.updated_at END
           FROM projects p, organizations o
           WHERE e.project_id = p.id AND p.organization_id = o.id
             AND o.slug = $1 AND p.slug = $2 AND e.slug = $3
           RETURNING e.max_jobs_in_flight, e.max_events_per_second"#,
        org,
        project,
        env,
        set.max_jobs_in_flight.is_some(),
        set.max_jobs_in_flight.flatten(),
        set.max_events_per_second.is_some(),
        set.max_events_per_second.flatten(),
        changes
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| Limits {
        max_jobs_in_flight: r.max_jobs_in_flight,
        max_events_per_second: r.max_events_per_second,
    }))
}

/// Create whatever of `org/project/env` is missing and give the environment a new API key.
/// An environment that already exists gets its key replaced: the old key stops working.
pub async fn create_environment(
    pool: &PgPool,
    path: &str,
    env_type: EnvironmentType,
) -> Result<CreatedEnvironment, EnvironmentError> {
    let [org, project, env] = slugs(path)?;
    let api_key = generate_api_key(env);
    let hash = hash_api_key(&api_key);
    let mut tx = pool.begin().await?;
    let org_id = sqlx::query_scalar!(
        r#"INSERT INTO organizations (id, slug) VALUES ($1, $2)
           ON CONFLICT (slug) DO UPDATE SET slug = EXCLUDED.slug
           RETURNING id"#,
        Uuid::now_v7(),
        org
    )
    .fetch_one(&mut *tx)
    .await?;
    let project_id = sqlx::query_scalar!(
        r#"INSERT INTO projects (id, organization_id, slug) VALUES ($1, $2, $3)
           ON CONFLICT (organization_id, slug) DO UPDATE SET slug = EXCLUDED.slug
           RETURNING id"#,
        Uuid::now_v7(),
        org_id,
        project
    )
    .fetch_one(&mut *tx)
    .await?;
    let row = sqlx::query!(
        r#"INSERT INTO runtime_environments (id, project_id, slug, type, api_key_hash)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (project_id, slug)
           DO UPDATE SET api_key_hash = EXCLUDED.api_key_hash, type = EXCLUDED.type, updated_at = now()
           RETURNING id, slug, type, max_events_per_second"#,
        Uuid::now_v7(),
        project_id,
        env,
        env_type.as_str(),
        hash
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(CreatedEnvironment {
        environment: Environment {
            id: row.id,
            slug: row.slug,
            env_type: row.r#type,
            project_id,
            max_events_per_second: row.max_events_per_second,
        },
        api_key,
    })
}

/// The environments of key hashes, by hash, with one query; each stored hash is compared
/// again in constant time.
async fn find_by_hashes(
    conn: &mut PgConnection,
    hashes: &[Vec<u8>],
) -> Result<HashMap<Vec<u8>, Environment>, sqlx::Error> {
    let rows = sqlx::query!(
        r#"SELECT id, slug, type, project_id, api_key_hash, max_events_per_second
           FROM runtime_environments WHERE api_key_hash = ANY($1)"#,
        hashes
    )
    .fetch_all(conn)
    .await?;
    Ok(hashes
        .iter()
        .filter_map(|hash| {
            let r = rows
                .iter()
                .find(|r| constant_time_eq(&r.api_key_hash, hash))?;
            Some((
                hash.clone(),
                Environment {
                    id: r.id,
                    slug: r.slug.clone(),
                    env_type: r.r#type.clone(),
                    project_id: r.project_id,
                    max_events_per_second: r.max_events_per_second,
                },
            ))
        })
        .collect())
}

/// The id of the environment's external account `identifier`, made on first use: the
/// account an event (or an EPHEMERAL dispatcher) names by its producer's identifier.
pub async fn external_account(
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

/// The id of the environment's external account `identifier`, if it exists (reading only).
pub async fn find_external_account(
    pool: &PgPool,
    environment_id: Uuid,
    identifier: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar!(
        "SELECT id FROM external_accounts WHERE environment_id = $1 AND identifier = $2",
        environment_id,
        identifier
    )
    .fetch_optional(pool)
    .await
}

/// How long [`KeyCache`] trusts what it looked up: a key replaced (an environment created
/// again) stops working within this time.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(1);

/// At most this many keys are remembered; past it, lookups go to the database until
/// entries expire.
pub const KEY_CACHE_CAPACITY: usize = 10_000;

/// API key lookups remembered for [`KEY_CACHE_TTL`], the keys no environment has included
/// (a client retrying with a wrong key costs one query a second, not one per request).
/// Entries are keyed by the key's hash: the cache holds no key. Clones share it.
#[derive(Clone, Default)]
pub struct KeyCache {
    entries: Arc<Mutex<HashMap<Vec<u8>, Looked>>>,
}

/// What [`KeyCache::cached`] knows of a key.
#[derive(Debug, Clone)]
pub enum Cached {
    /// Looked up within [`KEY_CACHE_TTL`]: its environment, or `None` for a key no
    /// environment has.
    Fresh(Option<Environment>),
    /// Looked up longer ago, when it was the key of this environment.
    Stale(Uuid),
    /// Not looked up lately.
    Unknown,
}

/// When a key hash was looked up, and its environment (`None`: no environment has it).
type Looked = (Instant, Option<Environment>);

impl KeyCache {
    /// The environment of `key`, from the cache while fresh, else from the database.
    pub async fn find(&self, pool: &PgPool, key: &str) -> Result<Option<Environment>, sqlx::Error> {
        Ok(self.find_many(pool, &[key]).await?.remove(key))
    }

    /// The environments of several keys, by key (a key no environment has is absent): the
    /// fresh ones from the cache, the others with one query.
    pub async fn find_many(
        &self,
        pool: &PgPool,
        keys: &[&str],
    ) -> Result<HashMap<String, Environment>, sqlx::Error> {
        let mut answer = HashMap::new();
        let mut unknown: Vec<(&str, Vec<u8>)> = Vec::new();
        for key in keys {
            let hash = hash_api_key(key);
            match self.fresh(&hash) {
                Some(Some(env)) => {
                    answer.insert(key.to_string(), env);
                }
                Some(None) => {}
                None => unknown.push((key, hash)),
            }
        }
        if unknown.is_empty() {
            return Ok(answer);
        }
        let hashes: Vec<Vec<u8>> = unknown.iter().map(|(_, h)| h.clone()).collect();
        let mut conn = pool.acquire().await?;
        let found = find_by_hashes(&mut conn, &hashes).await?;
        self.remember(hashes.iter().map(|h| (h.clone(), found.get(h).cloned())));
        for (key, hash) in unknown {
            if let Some(env) = found.get(&hash) {
                answer.insert(key.to_string(), env.clone());
            }
        }
        Ok(answer)
    }

    /// What the cache knows of `key`, without asking the database.
    pub fn cached(&self, key: &str) -> Cached {
        let hash = hash_api_key(key);
        let entries = self
            .entries
            .lock()
            .expect("the key cache lock is never poisoned");
        match entries.get(&hash) {
            Some((at, env)) if at.elapsed() < KEY_CACHE_TTL => Cached::Fresh(env.clone()),
            Some((_, Some(env))) => Cached::Stale(env.id),
            _ => Cached::Unknown,
        }
    }

    /// What the cache knows of a key hash, if it is still fresh.
    fn fresh(&self, hash: &[u8]) -> Option<Option<Environment>> {
        let entries = self
            .entries
            .lock()
            .expect("the key cache lock is never poisoned");
        let (at, env) = entries.get(hash)?;
        (at.elapsed() < KEY_CACHE_TTL).then(|| env.clone())
    }

    fn remember(&self, found: impl IntoIterator<Item = (Vec<u8>, Option<Environment>)>) {
        let now = Instant::now();
        let mut entries = self
            .entries
            .lock()
            .expect("the key cache lock is never poisoned");
        for (hash, env) in found {
            if entries.len() >= KEY_CACHE_CAPACITY {
                entries.retain(|_, (at, _)| at.elapsed() < KEY_CACHE_TTL);
            }
            if entries.len() < KEY_CACHE_CAPACITY || entries.contains_key(&hash) {
                entries.insert(hash, (now, env));
            }
        }
    }
}

/// Compare two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_have_the_documented_form() {
        let key = generate_api_key("dev");
        let rest = key.strip_prefix("tr_dev_").expect("prefix");
        assert_eq!(rest.len(), 32);
        assert!(rest.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(generate_api_key("dev"), key);
    }

    #[test]
    fn constant_time_eq_compares_bytes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn slugs_are_restricted() {
        assert!(valid_slug("my-org_1"));
        assert!(!valid_slug(""));
        assert!(!valid_slug("a b"));
        assert!(!valid_slug("a/b"));
    }
}
