//! The HTTP API (axum): trigger.dev v2's event calls, job registration, health.

pub mod auth;
pub mod error;
pub mod events;
pub mod jobs;

use axum::Router;
use axum::routing::{get, post, put};
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::EventsService;
use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub events: EventsService,
}

impl AppState {
    /// Ingest is group-committed: two committers, up to 200 events per transaction.
    pub fn new(pool: PgPool) -> Self {
        Self {
            events: EventsService::with_batching(pool.clone(), 2, 200),
            pool,
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/events", post(events::send_event))
        .route("/api/v2/events/{event_id}", get(events::get_event_v2))
        .route(
            "/api/v1/events/{event_id}/cancel",
            post(events::cancel_event),
        )
        .route("/api/v1/jobs/{job_id}", put(jobs::register_job))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
}

/// Serve until `shutdown`; requests in flight are finished first.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Dates as trigger.dev writes them: ISO 8601, milliseconds, `Z`.
pub fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}
