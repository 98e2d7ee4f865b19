//! The HTTP API (axum): trigger.dev v2's event calls, job registration, health.

pub mod auth;
pub mod error;
pub mod events;
pub mod jobs;
pub mod operator;
pub use crate::events::ratelimit;
pub mod triggers;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::EventsService;
use crate::config::HttpConfig;
use crate::db::environments::KeyCache;
use crate::metrics::metrics;
use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub events: EventsService,
    /// API keys looked up, remembered for a second.
    pub keys: KeyCache,
    /// Each environment's ingest allowance (`max_events_per_second`).
    pub limiter: ratelimit::RateLimiter,
    /// SHA-256 of the operator endpoints' token; `None`: they answer 403.
    pub operator_token: Option<Arc<[u8]>>,
}

impl AppState {
    /// Ingest is group-committed: two committers, up to 200 events per transaction; the
    /// relay publishes the delivery jobs.
    pub fn new(pool: PgPool) -> Self {
        Self {
            events: EventsService::with_batching(pool.clone(), 2, 200),
            pool,
            keys: KeyCache::default(),
            limiter: ratelimit::RateLimiter::default(),
            operator_token: None,
        }
    }

    /// Open the operator endpoints to callers bearing `token`.
    pub fn with_operator_token(self, token: Option<&crate::config::OperatorToken>) -> Self {
        Self {
            operator_token: token.map(|t| crate::db::environments::hash_api_key(&t.0).into()),
            ..self
        }
    }

    /// The same, publishing the delivery jobs right after each commit (the fast path).
    pub fn publishing(self, publisher: crate::amqp::DirectPublisher) -> Self {
        Self {
            events: EventsService::new(self.pool.clone())
                .publishing(publisher)
                .batching(2, 200),
            ..self
        }
    }
}

/// Largest body of a bulk send. Each of its events is also held to the one-event limits,
/// checked on its JSON text before any of it is parsed.
pub const MAX_BULK_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Largest body of any other request (axum's default).
pub const MAX_BODY_BYTES: usize = crate::events::wire::MAX_SEND_BODY_BYTES;

/// The API's routes, bounded as `config` says, with `operator_routes` (health, metrics)
/// beside them outside the in-flight bound; every request is counted and timed.
pub fn router(state: AppState, config: &HttpConfig, operator_routes: Router) -> Router {
    let in_flight = Arc::new(Semaphore::new(config.http_max_in_flight.max(1)));
    let request_timeout = config.request_timeout();
    Router::new()
        .route("/api/v1/events", post(events::send_event))
        .route(
            "/api/v1/events/bulk",
            post(events::send_events).layer(DefaultBodyLimit::max(MAX_BULK_BODY_BYTES)),
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
        .route(
            "/api/v1/event-dispatchers/ephemeral",
            post(triggers::post_ephemeral),
        )
        .route(
            "/api/v1/event-dispatchers/{id}",
            get(triggers::get_ephemeral),
        )
        .route("/api/openapi.json", get(openapi))
        .route(
            "/api/v1/dispatchers/{id}/enable",
            post(triggers::enable_dispatcher),
        )
        .route(
            "/api/v1/dispatchers/{id}/disable",
            post(triggers::disable_dispatcher),
        )
        .route(
            "/api/v1/operator/environments/{org}/{project}/{env}/limits",
            get(operator::get_limits).put(operator::put_limits),
        )
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(move |request, next| {
            bounded(in_flight.clone(), request_timeout, request, next)
        }))
        .merge(operator_routes)
        .layer(axum::middleware::from_fn(track))
        .layer(axum::middleware::from_fn(refuse_nul_in_path))
}

/// At most `HTTP_MAX_IN_FLIGHT` API requests at once (503 with `Retry-After` beyond, which
/// the v2 SDK retries), each within `HTTP_REQUEST_TIMEOUT_MS` (408 past it; an ingest whose
/// answer was cut may still have been stored, and sending it again with its id is safe).
async fn bounded(
    in_flight: Arc<Semaphore>,
    timeout: std::time::Duration,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = in_flight.try_acquire_owned() else {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight; retry shortly",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than {} ms (HTTP_REQUEST_TIMEOUT_MS)",
                timeout.as_millis()
            ),
        )
        .into_response(),
    }
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
    // Labels come from closed sets: a client inventing methods adds no series.
    let method = method_label(request.method());
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let status = response.status();
    let m = metrics();
    m.http_requests
        .with_label_values(&[&route, method, status.as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[&route, method])
        .observe(started.elapsed().as_secs_f64());
    if route == "/api/v1/events" && method == "POST" {
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

/// The metrics label of a method: the standard ones by name, any other `other`.
pub fn method_label(method: &Method) -> &'static str {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::HEAD,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN
        .iter()
        .find(|m| *m == method)
        .map_or("other", |m| m.as_str())
}

/// Serve `router` (see [`router`]) until `shutdown`; requests in flight are finished first.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "http listening");
    crate::serve::serve(listener, router, config.header_timeout(), shutdown).await
}
