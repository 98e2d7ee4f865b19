//! The operator console: pages served by the API under `/console`, rendered on the server
//! (maud, which escapes every value it writes), a stylesheet and a little JavaScript
//! embedded in the binary. Signed in with the operator token (see [`session`]); off, and
//! saying so, when no token is set. Every read and change goes through the owners' own
//! functions (events, runs, dispatchers, tenants, the ledger by way of `admin`): the
//! console owns only its sessions.

// A refusal is an HTTP answer (`Response`) carried by `?` to the handler's return; its
// size does not matter on this path.
#![allow(clippy::result_large_err)]

mod pages;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use sqlx::PgPool;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::amqp::Topology;
use crate::http::limits::Throttle;
use crate::tenants::{self, Environment, EnvironmentListing};
use session::Session;

/// How long a console session lasts when the configuration says nothing.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most console requests served at once; beyond it the console answers `503`.
pub const MAX_IN_FLIGHT: usize = 16;
/// Longest a console request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What the console's pages reach.
#[derive(Clone)]
pub struct ConsoleState {
    pub pool: PgPool,
    /// SHA-256 of the operator token; `None`: the console is off.
    pub operator_token: Option<Arc<[u8]>>,
    /// Failed sign-ins, counted with the operator endpoints' failed tokens.
    pub throttle: Throttle,
    pub session_ttl: Duration,
    /// Cookies marked `Secure` (the console is reached over HTTPS).
    pub secure_cookies: bool,
    /// The API's rate limiter in this process, for the overview's refused events.
    pub limiter: Option<crate::events::ratelimit::RateLimiter>,
    /// The broker, for the dead letters.
    pub amqp_url: String,
    pub topology: Topology,
    in_flight: Arc<Semaphore>,
}

impl ConsoleState {
    pub fn new(pool: PgPool, amqp_url: String, topology: Topology) -> Self {
        Self {
            pool,
            operator_token: None,
            throttle: Throttle::default(),
            session_ttl: DEFAULT_SESSION_TTL,
            secure_cookies: false,
            limiter: None,
            amqp_url,
            topology,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// Sign-in with `token` (none: the console is off); failed sign-ins counted in
    /// `throttle` (the operator endpoints' own, so both share one budget of attempts).
    pub fn signing_in_with(
        self,
        token: Option<&crate::config::OperatorToken>,
        throttle: Throttle,
    ) -> Self {
        Self {
            operator_token: token.map(|t| tenants::hash_api_key(&t.0).into()),
            throttle,
            ..self
        }
    }

    /// Show what `limiter` (the API's, in this process) refused.
    pub fn rate_limits_of(self, limiter: crate::events::ratelimit::RateLimiter) -> Self {
        Self {
            limiter: Some(limiter),
            ..self
        }
    }

    /// Sessions of `ttl`, cookies `Secure` when `secure`.
    pub fn sessions(self, ttl: Duration, secure: bool) -> Self {
        Self {
            session_ttl: ttl,
            secure_cookies: secure,
            ..self
        }
    }
}

/// The console's routes, under `/console`.
pub fn router(state: ConsoleState) -> Router {
    let guarded = Router::new()
        .route("/console", get(pages::overview))
        .route("/console/overview.json", get(pages::overview_json))
        .route("/console/events", get(pages::events))
        .route("/console/events/{id}", get(pages::event))
        .route("/console/events/{id}/cancel", post(pages::cancel_event))
        .route("/console/jobs", get(pages::jobs))
        .route("/console/jobs/retry-matching", post(pages::retry_matching))
        .route("/console/jobs/{id}", get(pages::job))
        .route("/console/jobs/{id}/retry", post(pages::retry_job))
        .route("/console/jobs/{id}/cancel", post(pages::cancel_job))
        .route("/console/dead-letters", get(pages::dead_letters))
        .route("/console/dead-letters/replay", post(pages::replay))
        .route("/console/dispatchers", get(pages::dispatchers))
        .route(
            "/console/dispatchers/{id}/enabled",
            post(pages::set_enabled),
        )
        .route("/console/environments", get(pages::environments))
        .route("/console/environments/limits", post(pages::set_limits))
        .route("/console/sign-out", post(pages::sign_out))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            signed_in,
        ));
    Router::new()
        .route(
            "/console/sign-in",
            get(pages::sign_in_page).post(pages::sign_in),
        )
        .route("/console/assets/console.css", get(css))
        .route("/console/assets/console.js", get(js))
        .merge(guarded)
        .layer(axum::middleware::from_fn_with_state(state.clone(), bounded))
        .with_state(state)
}

/// The client address of a request (for the sign-in throttle).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Client(pub Option<std::net::IpAddr>);

/// At most [`MAX_IN_FLIGHT`] console requests at once, each within [`REQUEST_TIMEOUT`];
/// the console's answers are never cached or framed by another site.
async fn bounded(State(state): State<ConsoleState>, mut request: Request, next: Next) -> Response {
    let client = Client(crate::serve::peer(&request).map(|a| a.ip()));
    request.extensions_mut().insert(client);
    let Ok(_place) = state.in_flight.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            "the console is busy; retry shortly",
        )
            .into_response();
    };
    let mut response = match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::REQUEST_TIMEOUT, "the console took too long").into_response(),
    };
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, "no-store".parse().expect("header"));
    h.insert(header::X_FRAME_OPTIONS, "DENY".parse().expect("header"));
    h.insert("x-content-type-options", "nosniff".parse().expect("header"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
            .parse()
            .expect("header"),
    );
    response
}

/// Pages past sign-in: off without an operator token, else a session (the sign-in page
/// otherwise); a change (POST) must come from the console's own pages (`Origin`) and carry
/// the session's form token, checked by the handler ([`Form`]).
async fn signed_in(
    State(state): State<ConsoleState>,
    mut request: Request,
    next: Next,
) -> Response {
    if state.operator_token.is_none() {
        return off();
    }
    let session = match session::find(&state.pool, request.headers()).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let Some(session) = session else {
        if request.method() == axum::http::Method::GET {
            return Redirect::to("/console/sign-in").into_response();
        }
        return refused(StatusCode::UNAUTHORIZED, "not signed in");
    };
    if request.method() == axum::http::Method::POST && !session::same_origin(request.headers()) {
        return refused(StatusCode::FORBIDDEN, "a change from another site");
    }
    request.extensions_mut().insert(session);
    next.run(request).await
}

/// The answer while no operator token is set.
fn off() -> Response {
    (
        StatusCode::FORBIDDEN,
        page_bare(
            "Console off",
            html! {
                h1 { "The console is off" }
                p { "Set " code { "OPERATOR_TOKEN" } " (at least 16 characters) to turn it on; \
                     sign in with that token." }
            },
        ),
    )
        .into_response()
}

/// An error page with `status`.
fn refused(status: StatusCode, why: &str) -> Response {
    (
        status,
        page_bare(
            "Refused",
            html! { h1 { (status.as_str()) " " (status.canonical_reason().unwrap_or("")) } p.error { (why) } },
        ),
    )
        .into_response()
}

fn failed(e: impl std::fmt::Display) -> Response {
    tracing::error!(error = %e, "console");
    refused(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("assets/console.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("assets/console.js"),
    )
}

/// A page without the navigation (sign-in, errors).
fn page_bare(title: &str, body: Markup) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · kongflow-events" }
                    link rel="stylesheet" href="/console/assets/console.css";
                }
                body { main.narrow { (body) } }
            }
        }
        .into_string(),
    )
}

/// The environment a page shows: the `env` of its query (a path or an id), else the first.
pub(crate) struct Scope {
    pub all: Vec<EnvironmentListing>,
    pub current: Option<Environment>,
    pub path: Option<String>,
}

impl Scope {
    pub(crate) async fn of(pool: &PgPool, env: Option<&str>) -> Result<Self, Response> {
        let all = tenants::listing(pool).await.map_err(failed)?;
        let chosen = match env.filter(|e| !e.is_empty()) {
            Some(e) => all
                .iter()
                .find(|l| l.path == e || Uuid::parse_str(e).is_ok_and(|id| id == l.id)),
            None => all.first(),
        };
        let current = chosen.map(EnvironmentListing::environment);
        let path = chosen.map(|l| l.path.clone());
        Ok(Self { all, current, path })
    }

    /// The environment shown, for a change that needs one (404 without).
    pub(crate) fn env(&self) -> Result<&Environment, Response> {
        self.current
            .as_ref()
            .ok_or_else(|| refused(StatusCode::NOT_FOUND, "no such environment"))
    }

    /// The path of the environment `id`, or the id itself for one that is gone.
    pub(crate) fn path_of(&self, id: Uuid) -> String {
        self.all
            .iter()
            .find(|l| l.id == id)
            .map(|l| l.path.clone())
            .unwrap_or_else(|| id.to_string())
    }
}

/// Which page the navigation marks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Overview,
    Events,
    Jobs,
    DeadLetters,
    Dispatchers,
    Environments,
}

impl Nav {
    const ALL: [(Nav, &'static str, &'static str); 6] = [
        (Nav::Overview, "/console", "Overview"),
        (Nav::Events, "/console/events", "Events"),
        (Nav::Jobs, "/console/jobs", "Jobs"),
        (Nav::DeadLetters, "/console/dead-letters", "Dead letters"),
        (Nav::Dispatchers, "/console/dispatchers", "Dispatchers"),
        (Nav::Environments, "/console/environments", "Environments"),
    ];
}

/// A page: the navigation, the environment switcher, sign-out, then `body`.
pub(crate) fn page(
    title: &str,
    nav: Nav,
    scope: &Scope,
    session: &Session,
    body: Markup,
) -> Html<String> {
    let here = Nav::ALL
        .iter()
        .find(|(n, _, _)| *n == nav)
        .map(|(_, href, _)| *href)
        .unwrap_or("/console");
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    meta name="csrf" content=(session.csrf);
                    title { (title) " · kongflow-events" }
                    link rel="stylesheet" href="/console/assets/console.css";
                    script src="/console/assets/console.js" defer {}
                }
                body {
                    header.top {
                        span.brand { "kongflow-events" }
                        nav {
                            @for (n, href, label) in Nav::ALL {
                                @let href = with_env(href, scope.path.as_deref());
                                @if n == nav { a.current href=(href) { (label) } }
                                @else { a href=(href) { (label) } }
                            }
                        }
                        form.switcher method="get" action=(here) {
                            label for="env" { "Environment" }
                            select #env name="env" data-autosubmit {
                                @for e in &scope.all {
                                    option value=(e.path) selected[Some(&e.path) == scope.path.as_ref()] { (e.path) }
                                }
                            }
                            noscript { button type="submit" { "Show" } }
                        }
                        form.signout method="post" action="/console/sign-out" {
                            (csrf_field(session))
                            button type="submit" { "Sign out" }
                        }
                    }
                    main { (body) }
                }
            }
        }
        .into_string(),
    )
}

/// `text` as a value of a URL's query (form encoding).
pub(crate) fn query_value(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// `href` with the environment in its query.
pub(crate) fn with_env(href: &str, env: Option<&str>) -> String {
    match env {
        Some(e) => format!(
            "{href}{}env={}",
            if href.contains('?') { '&' } else { '?' },
            query_value(e)
        ),
        None => href.to_string(),
    }
}

/// The hidden field every form of a signed-in page carries.
pub(crate) fn csrf_field(session: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(session.csrf); }
}

/// JSON shown indented, escaped by maud.
pub(crate) fn pretty(value: &serde_json::Value) -> Markup {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    html! { pre.json { (text) } }
}

/// A time as the console shows it (UTC, to the millisecond).
pub(crate) fn when(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// Flash text carried to the next page in the query (`?done=`), shown escaped.
pub(crate) fn notice(done: Option<&str>) -> Markup {
    html! { @if let Some(d) = done.filter(|d| !d.is_empty()) { p.notice role="status" { (d) } } }
}

/// Where to go after a change, with what it did.
pub(crate) fn back(to: &str, done: &str) -> Response {
    let sep = if to.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{to}{sep}done={}", query_value(done))).into_response()
}

/// Whether a form's token (`given`) is the session's: every change checks.
pub(crate) fn check_csrf(session: &Session, given: Option<&str>) -> Result<(), Response> {
    if session::csrf_ok(session, given) {
        Ok(())
    } else {
        Err(refused(
            StatusCode::FORBIDDEN,
            "the form's token is missing or not this session's: reload the page and try again",
        ))
    }
}
