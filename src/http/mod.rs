//! The HTTP API (axum): trigger.dev v2's event calls, job registration, health.

pub mod auth;
pub mod error;
pub mod events;
pub mod jobs;
pub mod limits;
pub mod openapi;
pub use crate::events::ratelimit;
pub mod triggers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouterExt};
use utoipa_axum::routes;
use uuid::Uuid;

use crate::EventsService;
use crate::config::HttpConfig;
use crate::metrics::metrics;
use crate::tenants::{Cached, KeyCache};
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
    /// Failed attempts at the operator token.
    pub operator_throttle: limits::Throttle,
}

/// Ingest through the API is group-committed by this many committers...
pub const INGEST_COMMITTERS: usize = 2;
/// ...each storing up to this many events per transaction.
pub const INGEST_MAX_BATCH: usize = 200;

/// The API's events service: group-committed ([`INGEST_COMMITTERS`],
/// [`INGEST_MAX_BATCH`]), publishing the delivery jobs right after each commit when given a
/// publisher (the fast path), else leaving them to the relay.
fn ingest_service(pool: PgPool, publisher: Option<crate::amqp::DirectPublisher>) -> EventsService {
    let service = EventsService::new(pool);
    match publisher {
        Some(p) => service.publishing(p),
        None => service,
    }
    .batching(INGEST_COMMITTERS, INGEST_MAX_BATCH)
}

impl AppState {
    /// Ingest is group-committed (see [`ingest_service`]); the relay publishes the delivery
    /// jobs.
    pub fn new(pool: PgPool) -> Self {
        Self {
            events: ingest_service(pool.clone(), None),
            pool,
            keys: KeyCache::default(),
            limiter: ratelimit::RateLimiter::default(),
            operator_token: None,
            operator_throttle: limits::Throttle::default(),
        }
    }

    /// Open the operator endpoints to callers bearing `token`.
    pub fn with_operator_token(self, token: Option<&crate::config::OperatorToken>) -> Self {
        Self {
            operator_token: token.map(|t| crate::tenants::hash_api_key(&t.0).into()),
            ..self
        }
    }

    /// The same, publishing the delivery jobs right after each commit (the fast path).
    pub fn publishing(self, publisher: crate::amqp::DirectPublisher) -> Self {
        Self {
            events: ingest_service(self.pool.clone(), Some(publisher)),
            ..self
        }
    }
}

/// Largest body of a bulk send. Each of its events is also held to the one-event limits,
/// checked on its JSON text before any of it is parsed.
pub const MAX_BULK_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Largest body of any other request (axum's default).
pub const MAX_BODY_BYTES: usize = crate::events::wire::MAX_SEND_BODY_BYTES;

/// The API's routes, each with its documentation (`#[utoipa::path]` on its handler): the
/// router and the OpenAPI document (`openapi::document`) are both made from this list.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(events::send_event, events::list_events))
        .routes(routes!(events::send_events).layer(DefaultBodyLimit::max(MAX_BULK_BODY_BYTES)))
        .routes(routes!(triggers::match_event))
        .routes(routes!(events::get_event_v1))
        .routes(routes!(events::get_event_v2))
        .routes(routes!(events::cancel_event))
        .routes(routes!(events::cancel_runs))
        .routes(routes!(jobs::register_job))
        .routes(routes!(triggers::put_dynamic_trigger))
        .routes(routes!(triggers::post_registration))
        .routes(routes!(triggers::delete_registration))
        .routes(routes!(triggers::list_dispatchers))
        .routes(routes!(triggers::enable_dispatcher))
        .routes(routes!(triggers::disable_dispatcher))
        .routes(routes!(triggers::post_ephemeral))
        .routes(routes!(triggers::get_ephemeral))
        .routes(routes!(limits::get_limits, limits::put_limits))
        .routes(routes!(openapi::openapi))
}

/// The API's routes, bounded as `config` says, with `operator_routes` (the probes) beside
/// them outside the in-flight bound; every request is counted and timed.
pub fn router(state: AppState, config: &HttpConfig, operator_routes: Router) -> Router {
    let admission = Admission::new(config);
    let admitting = state.clone();
    let (routes, _) = routes().split_for_parts();
    routes
        .method_not_allowed_fallback(|method: Method| async move {
            // axum adds the `Allow` header.
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on this route (see the Allow header)"),
            )
        })
        .fallback(|| async { ApiError::not_found("no such route") })
        .with_state(state)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(move |request, next| {
            admit(admitting.clone(), admission.clone(), request, next)
        }))
        .merge(operator_routes)
        .layer(axum::middleware::from_fn(track))
        .layer(axum::middleware::from_fn(refuse_nul_in_path))
}

/// How long a key not yet known waits for a lookup before the API answers 503.
const LOOKUP_WAIT: Duration = Duration::from_millis(250);

/// The in-flight places of the API and who holds them.
#[derive(Clone)]
struct Admission {
    /// `HTTP_MAX_IN_FLIGHT`.
    all: Arc<Semaphore>,
    /// Most places one environment (or the operator) may have at once.
    per_holder: usize,
    /// Most places public routes have together.
    unauthenticated: usize,
    /// Lookups of keys not yet known at once.
    lookups: Arc<Semaphore>,
    held: Arc<std::sync::Mutex<HashMap<Holder, usize>>>,
    request_timeout: Duration,
    body_timeout: Duration,
}

/// Who a place is held for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Holder {
    Environment(Uuid),
    Operator,
    /// Public routes (no credentials), together.
    Unauthenticated,
}

/// A place of all and of its holder, given back when dropped.
struct Place {
    _all: OwnedSemaphorePermit,
    holder: Holder,
    held: Arc<std::sync::Mutex<HashMap<Holder, usize>>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("in-flight lock");
        if let Some(n) = held.get_mut(&self.holder) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.holder);
            }
        }
    }
}

impl Admission {
    /// One of the lookups of keys not yet known, waiting a moment for one.
    async fn lookup(&self) -> Option<OwnedSemaphorePermit> {
        tokio::time::timeout(LOOKUP_WAIT, self.lookups.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }

    fn busy_looking_up(&self) -> Response {
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests with keys not yet known in flight; retry shortly",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        response
    }

    fn new(config: &HttpConfig) -> Self {
        Self {
            lookups: Arc::new(Semaphore::new(config.in_flight_unauthenticated())),
            all: Arc::new(Semaphore::new(config.http_max_in_flight.max(1))),
            per_holder: config.in_flight_per_environment(),
            unauthenticated: config.in_flight_unauthenticated(),
            held: Arc::default(),
            request_timeout: config.http_request_timeout,
            body_timeout: config.http_body_timeout,
        }
    }

    /// A place for `holder`, or the answer saying there is none: 503 when the API is
    /// full, 429 when the holder has its share (503 for the unauthenticated, who share one).
    fn take(&self, holder: Holder) -> Result<Place, ApiError> {
        let busy = |status, message: String| ApiError {
            retry_after: Some(Duration::from_secs(1)),
            ..ApiError::new(status, message)
        };
        let Ok(all) = self.all.clone().try_acquire_owned() else {
            return Err(busy(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many requests in flight; retry shortly".into(),
            ));
        };
        let share = match holder {
            Holder::Unauthenticated => self.unauthenticated,
            _ => self.per_holder,
        };
        let mut held = self.held.lock().expect("in-flight lock");
        let n = held.entry(holder).or_insert(0);
        if *n >= share {
            let n = *n;
            if n == 0 {
                held.remove(&holder);
            }
            return Err(match holder {
                Holder::Unauthenticated => busy(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("too many requests to public routes in flight ({n}); retry shortly"),
                ),
                _ => busy(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "this environment has {n} requests in flight, the most one may \
                         (HTTP_MAX_IN_FLIGHT_PER_ENVIRONMENT); retry shortly"
                    ),
                ),
            });
        }
        *n += 1;
        drop(held);
        Ok(Place {
            _all: all,
            holder,
            held: self.held.clone(),
        })
    }
}

/// What a key lookup holds while it runs.
enum Lookup {
    Place(#[allow(dead_code)] Place),
    Permit(#[allow(dead_code)] OwnedSemaphorePermit),
}

/// What a body read may take (`HTTP_BODY_TIMEOUT_MS`), for [`error::JsonText`].
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub Duration);

/// Admission of an API request, before anything of its body is read: the caller is
/// authenticated first (an API key, or the operator token on operator routes; none on the
/// public ones), and refused at once, unread, without a valid one. Then it takes a place:
/// at most `HTTP_MAX_IN_FLIGHT` requests at once (503 with `Retry-After` beyond, which the
/// v2 SDK retries), at most a share of them per environment (429 with `Retry-After`), at
/// most an eighth for public routes together. A key not looked up within the key cache's
/// second is looked up holding a place of its environment when it had one, else one of an
/// eighth as many lookups of keys not yet known (503 when none frees within 250 ms).
/// Each request runs within `HTTP_REQUEST_TIMEOUT_MS` (408 past it; an ingest whose answer
/// was cut may still have been stored, and sending it again with its id is safe), and its
/// body must arrive within `HTTP_BODY_TIMEOUT_MS` (408).
async fn admit(
    state: AppState,
    admission: Admission,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let holder = if path.starts_with("/api/v1/operator/") {
        let client = crate::serve::peer(&request).map(|a| a.ip());
        if let Err(e) = limits::admit(&state, request.headers(), client) {
            return e.into_response();
        }
        Holder::Operator
    } else if path.starts_with("/api/") && path != "/api/openapi.json" {
        let key = match auth::api_key(request.headers()) {
            Ok(key) => key,
            Err(e) => return e.into_response(),
        };
        let started = std::time::Instant::now();
        let env = match state.keys.cached(key) {
            Cached::Fresh(env) => env,
            looked => {
                // A key this environment had is looked up again holding one of its places;
                // any other key holding one of the few lookups of keys not yet known, for
                // a moment: wrong keys cannot take more.
                let _place = match looked {
                    Cached::Stale(env) => match admission.take(Holder::Environment(env)) {
                        Ok(place) => Lookup::Place(place),
                        Err(busy) => return busy.into_response(),
                    },
                    _ => match admission.lookup().await {
                        Some(permit) => Lookup::Permit(permit),
                        None => return admission.busy_looking_up(),
                    },
                };
                match state.keys.find(&state.pool, key).await {
                    Ok(env) => env,
                    Err(e) => return ApiError::from(e).into_response(),
                }
            }
        };
        crate::metrics::metrics().stage(crate::metrics::Stage::Auth, started);
        let Some(env) = env else {
            return ApiError::unauthorized("invalid API key").into_response();
        };
        let holder = Holder::Environment(env.id);
        request.extensions_mut().insert(env);
        holder
    } else {
        Holder::Unauthenticated
    };
    let _place = match admission.take(holder) {
        Ok(place) => place,
        Err(busy) => return busy.into_response(),
    };
    request
        .extensions_mut()
        .insert(BodyTimeout(admission.body_timeout));
    let timeout = admission.request_timeout;
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
    let limits = crate::serve::Limits {
        header_timeout: config.http_header_timeout,
        max_connections: config.http_max_connections,
    };
    crate::serve::serve(listener, router, limits, shutdown).await
}
