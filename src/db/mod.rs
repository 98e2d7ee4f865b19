//! Postgres: pool set-up, migrations, the storage layout (the time slices of the tables
//! written per event: [`slices`]), and the installation's identity.

pub mod keys;
pub mod slices;

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The migrations in `migrations/`, embedded in the binary. Running them accepts a database
/// ahead of this build (see [`migrate`]).
pub static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> =
    std::sync::LazyLock::new(|| {
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        migrator
    });

/// Open a pool. The pool reconnects by itself: a connection that broke is dropped and a new
/// one is opened on the next acquire.
///
/// Statements are planned for their parameters each time (`plan_cache_mode =
/// force_custom_plan`): a connection caches its prepared statements for its whole life, and a
/// generic plan made while the tables were small (a seq scan of `event_records`, say) would
/// outlive the tables' growth by hours.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options =
        PgConnectOptions::from_str(url)?.options([("plan_cache_mode", "force_custom_plan")]);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
}

/// How the pipeline's transactions begin (see [`begin_pipeline`]): one round trip, as a
/// plain `BEGIN`.
const PIPELINE_BEGIN: &str =
    "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off";

/// Begin one of the pipeline's transactions (an ingest's commit, a worker's batch, a relay's
/// claim), whose statements keep their plans: each is planned once per connection, not at
/// every execution as the connection's `force_custom_plan` would (planning was half of
/// Postgres's time per event at 200 events/s). That is safe for them, not for every
/// statement: each reaches its rows by key or by an index's leading columns, so its generic
/// plan is the plan for any size of the tables, and `enable_seqscan = off` keeps a plan made
/// while a table was small from being a sequential scan that outlives its growth. A
/// statement added to these transactions must be of that kind (one with optional filters,
/// as the listings have, needs custom plans). Both settings end with the transaction.
pub async fn begin_pipeline(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with(PIPELINE_BEGIN).await
}

/// Apply pending migrations. Safe to run from several processes at once: sqlx takes an
/// advisory lock. A database ahead of this build (migrations of a later release applied:
/// this build rolled back to) is accepted when every migration this build knows is applied
/// unchanged: each release's migrations keep the release before it working (ARCHITECTURE.md,
/// Migrations); [`newer_migrations`] tells which. An applied migration whose text differs
/// from this build's is still refused.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Migrations applied to the database that this build does not know: a later release's.
pub async fn newer_migrations(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
    sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations WHERE NOT version = ANY($1) ORDER BY version",
    )
    .bind(&known)
    .fetch_all(pool)
    .await
}

/// Whether connecting failed for a reason that waiting will not fix: the server refused the
/// role, the password or the database (SQLSTATE classes 28 and 3D), or the URL is wrong.
pub fn is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Configuration(_) => true,
        e if is_tls_failure(e) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("28") || code.starts_with("3D")),
        _ => false,
    }
}

/// Whether the TLS handshake failed: the server's certificate is not trusted (signed by
/// no CA of `sslrootcert`, for another host, expired), or the server speaks no TLS where
/// `sslmode` requires it. Waiting does not fix either.
pub fn is_tls_failure(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Tls(_) => true,
        sqlx::Error::Io(io) => {
            let text = io.to_string();
            text.contains("certificate") || text.contains("CertificateUnknown")
        }
        _ => false,
    }
}

/// This installation's identity (one per database, made by the migrations): claimed on the
/// broker under `AMQP_PREFIX` at start (`amqp::owner`).
pub async fn installation(pool: &PgPool) -> Result<uuid::Uuid, sqlx::Error> {
    sqlx::query_scalar!("SELECT id FROM installation")
        .fetch_one(pool)
        .await
}
