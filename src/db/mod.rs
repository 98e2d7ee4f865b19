//! Postgres: pool set-up, migrations, and the installation's identity.

use std::str::FromStr;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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

/// Apply pending migrations. Safe to run from several processes at once: sqlx takes an
/// advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Whether connecting failed for a reason that waiting will not fix: the server refused the
/// role, the password or the database (SQLSTATE classes 28 and 3D), or the URL is wrong.
pub fn is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Configuration(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("28") || code.starts_with("3D")),
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
