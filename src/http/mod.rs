//! The HTTP API (axum): trigger.dev v2's event calls, job registration, health.

pub mod auth;
pub mod error;
pub mod events;
pub mod jobs;
pub mod triggers;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::EventsService;
use crate::events::{MAX_BULK_EVENTS, MAX_PAYLOAD_BYTES};
use crate::metrics::metrics;
use crate::ops::{self, OpsState};
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

pub fn router(state: AppState, ops_state: OpsState) -> Router {
    Router::new()
        .route("/api/v1/events", post(events::send_event))
        .route(
            "/api/v1/events/bulk",
            post(events::send_events).layer(DefaultBodyLimit::max(
                MAX_BULK_EVENTS * MAX_PAYLOAD_BYTES + 1024 * 1024,
            )),
        )
        .route("/api/v1/events/{event_id}", get(events::get_event_v2))
        .route("/api/v2/events/{event_id}", get(events::get_event_v2))
        .route(
            "/api/v1/events/{event_id}/cancel-runs",
            post(events::cancel_runs),
        )
        .route(
            "/api/v1/events/{event_id}/cancel",
            post(events::cancel_event),
        )
        .route("/api/v1/jobs/{job_id}", put(jobs::register_job))
        .route("/api/v1/events/match", post(triggers::match_event))
        .route(
            "/api/v1/dynamic-triggers/{id}",
            put(triggers::put_dynamic_trigger),
        )
        .route(
            "/api/v1/dynamic-triggers/{id}/registrations",
            post(triggers::post_registration),
        )
        .route(
            "/api/v1/dynamic-triggers/{id}/registrations/{key}",
            delete(triggers::delete_registration),
        )
        .route("/api/v1/dispatchers", get(triggers::list_dispatchers))
        .route("/api/openapi.json", get(openapi))
        .route(
            "/api/v1/dispatchers/{id}/enable",
            post(triggers::enable_dispatcher),
        )
        .route(
            "/api/v1/dispatchers/{id}/disable",
            post(triggers::disable_dispatcher),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
        .merge(ops::router(ops_state))
        .layer(axum::middleware::from_fn(track))
        .layer(axum::middleware::from_fn(refuse_nul_in_path))
}

/// Postgres stores no NUL character: an id with one (`%00`) can name nothing.
async fn refuse_nul_in_path(request: Request, next: Next) -> Response {
    if request.uri().path().contains("%00") {
        return ApiError::bad_request("the path must not contain the NUL character (%00)")
            .into_response();
    }
    next.run(request).await
}

/// The OpenAPI document of this API (`api/openapi.json`).
pub const OPENAPI: &str = include_str!("../../api/openapi.json");

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}

/// Count and time every request by its route pattern; count events stored and refused.
async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().clone();
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    let m = metrics();
    m.http_requests
        .with_label_values(&[&route, method.as_str(), status.as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[&route, method.as_str()])
        .observe(started.elapsed().as_secs_f64());
    if route == "/api/v1/events" && method == Method::POST {
        if status.is_success() {
            m.events_ingested.with_label_values(&["api"]).inc();
        } else {
            let reason = match status {
                StatusCode::UNAUTHORIZED => "unauthorized",
                StatusCode::PAYLOAD_TOO_LARGE => "too_large",
                StatusCode::SERVICE_UNAVAILABLE => "unavailable",
                s if s.is_client_error() => "invalid",
                _ => "error",
            };
            m.events_rejected.with_label_values(&[reason]).inc();
        }
    }
    response
}

/// Serve until `shutdown`; requests in flight are finished first.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    ops_state: OpsState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    axum::serve(listener, router(state, ops_state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Dates as trigger.dev writes them: ISO 8601, milliseconds, `Z`.
pub fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}
