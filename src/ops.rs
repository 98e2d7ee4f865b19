//! What every long-running process serves for its operators: `/metrics` (Prometheus text),
//! `/healthz` (the process lives) and `/readyz` (it reaches Postgres and RabbitMQ and is
//! not shutting down). The HTTP API serves these routes itself; a relay or worker process
//! serves them on `METRICS_ADDR`.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::app::Roles;
use crate::metrics::metrics;

/// What the readiness check looks at.
#[derive(Clone)]
pub struct OpsState {
    pub pool: PgPool,
    pub amqp_url: String,
    pub roles: Roles,
    pub shutdown: CancellationToken,
}

pub fn router(state: OpsState) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
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

async fn readyz(State(state): State<OpsState>) -> (StatusCode, String) {
    let problems = readiness_problems(&state).await;
    metrics().ready.set(problems.is_empty() as i64);
    if problems.is_empty() {
        (StatusCode::OK, "ready".into())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems.join("; "))
    }
}

/// Why the process is not ready; empty when it is.
pub async fn readiness_problems(state: &OpsState) -> Vec<String> {
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
    }
    let m = metrics();
    let mut amqp_roles = Vec::new();
    if state.roles.relay {
        amqp_roles.push("relay");
    }
    if state.roles.worker {
        amqp_roles.push("worker");
    }
    if amqp_roles.is_empty() {
        // An HTTP-only process holds no broker connection: try one.
        let ok = tokio::time::timeout(
            Duration::from_secs(2),
            crate::amqp::connect(&state.amqp_url, "kongflow-readyz"),
        )
        .await;
        match ok {
            Ok(Ok(conn)) => {
                let _ = conn.close(200, "ready".into()).await;
            }
            _ => problems.push("rabbitmq unreachable".to_string()),
        }
    }
    for role in amqp_roles {
        if m.amqp_connected.with_label_values(&[role]).get() <= 0 {
            problems.push(format!("{role} not connected to rabbitmq"));
        }
    }
    problems
}

/// Keep `kongflow_ready` and `kongflow_postgres_up` current (every 5 s) whether or not
/// anyone calls `/readyz`, until shutdown; then not ready.
pub async fn probe_readiness(state: OpsState) {
    loop {
        let ready = readiness_problems(&state).await.is_empty();
        metrics().ready.set(ready as i64);
        tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
    metrics().ready.set(0);
}

/// Serve the operator routes on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: OpsState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Counts one live connection of a role for as long as it is held.
pub struct ConnectedGuard(&'static str);

impl ConnectedGuard {
    pub fn new(role: &'static str) -> Self {
        metrics().amqp_connected.with_label_values(&[role]).inc();
        Self(role)
    }
}

impl Drop for ConnectedGuard {
    fn drop(&mut self) {
        metrics().amqp_connected.with_label_values(&[self.0]).dec();
    }
}
