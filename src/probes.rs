//! What every long-running process serves for its operators: `/metrics` (Prometheus text),
//! `/healthz` (the process lives) and `/readyz` (it reaches Postgres and RabbitMQ and is
//! not shutting down), on `METRICS_ADDR`. The HTTP API serves `/healthz` and `/readyz`
//! beside it too, never `/metrics` (its labels name tenants).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Roles;
use crate::metrics::metrics;

/// What the readiness check looks at, and its last result.
#[derive(Clone)]
pub struct ProbesState {
    pub pool: PgPool,
    pub amqp_url: String,
    pub roles: Roles,
    pub shutdown: CancellationToken,
    /// What the last probe found wrong (`None` before the first probe): `/readyz` answers
    /// from it, so a flood of probes costs nothing and opens no connection.
    pub last_probe: Arc<Mutex<Option<Vec<String>>>>,
}

impl ProbesState {
    pub fn new(pool: PgPool, amqp_url: String, roles: Roles, shutdown: CancellationToken) -> Self {
        Self {
            pool,
            amqp_url,
            roles,
            shutdown,
            last_probe: Arc::new(Mutex::new(None)),
        }
    }
}

/// How often readiness is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Every operator route, for the metrics listener.
pub fn router(state: ProbesState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .merge(health_router(state))
}

/// The probes alone, for the API's port.
pub fn health_router(state: ProbesState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn render_metrics() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().render(),
    )
}

async fn readyz(State(state): State<ProbesState>) -> (StatusCode, String) {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down".into());
    }
    let last = state.last_probe.lock().expect("probe lock").clone();
    match last {
        Some(problems) if problems.is_empty() => (StatusCode::OK, "ready".into()),
        Some(problems) => (StatusCode::SERVICE_UNAVAILABLE, problems.join("; ")),
        None => (StatusCode::SERVICE_UNAVAILABLE, "not probed yet".into()),
    }
}

/// Why the process is not ready; empty when it is. An HTTP-only process holds no broker
/// connection of its own: `probe_conn` keeps one open for this check, opened again only
/// when it has dropped.
async fn readiness_problems(
    state: &ProbesState,
    probe_conn: &mut Option<lapin::Connection>,
) -> Vec<String> {
    let mut problems = Vec::new();
    if state.shutdown.is_cancelled() {
        problems.push("shutting down".to_string());
    }
    let pg = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pool),
    )
    .await;
    let pg_up = matches!(pg, Ok(Ok(1)));
    metrics().postgres_up.set(pg_up as i64);
    if !pg_up {
        problems.push("postgres unreachable".to_string());
    } else if let Some(missing) = migrations_missing(&state.pool).await {
        problems.push(missing);
    }
    let m = metrics();
    let mut amqp_roles = Vec::new();
    if state.roles.ingest {
        amqp_roles.push("ingest");
    }
    if state.roles.relay {
        amqp_roles.push("relay");
    }
    if state.roles.worker {
        amqp_roles.push("worker");
    }
    if amqp_roles.is_empty() {
        if !probe_conn.as_ref().is_some_and(|c| c.status().connected()) {
            *probe_conn = match tokio::time::timeout(
                Duration::from_secs(2),
                crate::amqp::connect(&state.amqp_url, "kongflow-readyz"),
            )
            .await
            {
                Ok(Ok(conn)) => Some(conn),
                _ => None,
            };
        }
        if probe_conn.is_none() {
            problems.push("rabbitmq unreachable".to_string());
        }
    }
    for role in amqp_roles {
        if m.amqp_connected.with_label_values(&[role]).get() <= 0 {
            problems.push(format!("{role} not connected to rabbitmq"));
        }
    }
    problems
}

/// Why the schema is not the one this build needs (a process started with
/// `KONGFLOW_NO_MIGRATE` waits, not ready, for the migration Job); `None` when it is.
async fn migrations_missing(pool: &PgPool) -> Option<String> {
    let needed = crate::db::MIGRATOR.iter().map(|m| m.version).max()?;
    let applied = sqlx::query_scalar::<_, Option<i64>>(
        "SELECT max(version) FROM _sqlx_migrations WHERE success",
    )
    .fetch_one(pool)
    .await;
    match applied {
        Ok(Some(v)) if v >= needed => None,
        Ok(_) | Err(_) => Some(format!(
            "migrations not applied (this build needs {needed}): run `kongflow-events migrate`"
        )),
    }
}

/// Probe readiness every [`PROBE_INTERVAL`] until shutdown, keeping `kongflow_ready`,
/// `kongflow_postgres_up` and the answer of `/readyz` current; then not ready.
pub async fn probe_readiness(state: ProbesState) {
    let mut probe_conn = None;
    loop {
        let problems = readiness_problems(&state, &mut probe_conn).await;
        metrics().ready.set(problems.is_empty() as i64);
        *state.last_probe.lock().expect("probe lock") = Some(problems);
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
    metrics().ready.set(0);
    if let Some(conn) = probe_conn {
        let _ = conn.close(200, "bye".into()).await;
    }
}

/// Serve the operator routes on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ProbesState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    crate::serve::serve(
        listener,
        router(state),
        crate::serve::Limits {
            header_timeout: OPS_HEADER_TIMEOUT,
            max_connections: OPS_MAX_CONNECTIONS,
        },
        shutdown,
    )
    .await
}

/// Scrapers and probes send their headers at once.
const OPS_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapers and probes need few connections.
const OPS_MAX_CONNECTIONS: usize = 64;
