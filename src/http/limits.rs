//! Operator endpoints: what the `env` command does, over HTTP, for a bearer of
//! `OPERATOR_TOKEN` (not an environment's API key: they change any environment).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::AppState;
use super::error::{ApiError, ApiJson, ErrorBody};
use crate::tenants::{self, EnvironmentError, Limits, SetLimits};

/// An environment's limits, as the API shows them (`null`: no limit).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = EnvironmentLimits)]
pub struct LimitsBody {
    /// org/project/env
    pub environment: String,
    /// due jobs of each kind published and not yet final; null: no limit
    #[schema(required, minimum = 1)]
    pub max_jobs_in_flight: Option<i32>,
    /// events accepted per second over HTTP (429 with Retry-After beyond); null: no limit
    #[schema(required, minimum = 1)]
    pub max_events_per_second: Option<i32>,
}

/// A change of limits: a field left out stays as it is, `null` lifts the limit.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = SetEnvironmentLimits)]
pub struct PutLimitsBody {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i32>, minimum = 1)]
    pub max_jobs_in_flight: Option<Option<i32>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i32>, minimum = 1)]
    pub max_events_per_second: Option<Option<i32>>,
}

/// The environment an operator route names.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct EnvironmentPath {
    /// organization slug
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub org: String,
    /// project slug
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub project: String,
    /// environment slug
    #[param(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub env: String,
}

/// The 429 of the operator routes.
const OPERATOR_THROTTLED: &str = "too many failed attempts at the operator token from this \
     client (10 a minute) or from all (100 a minute): refused without checking the token until \
     `Retry-After`";

/// A field that is present, `null` or not: `Some(None)` for `null`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i32>>, D::Error> {
    Option::<i32>::deserialize(d).map(Some)
}

/// `GET /api/v1/operator/environments/{org}/{project}/{env}/limits`
#[utoipa::path(
    get,
    path = "/api/v1/operator/environments/{org}/{project}/{env}/limits",
    operation_id = "getEnvironmentLimits",
    summary = "An environment's limits (operators)",
    params(EnvironmentPath),
    responses(
        (status = 200, description = "the environment's limits", body = LimitsBody),
        (status = 400, description = "a slug that is not valid", body = ErrorBody),
        (status = 401, description = "no operator token, or not the one configured", body = ErrorBody),
        (status = 403, description = "the operator endpoints are off (OPERATOR_TOKEN is not set)", body = ErrorBody),
        (status = 404, description = "no such environment", body = ErrorBody),
        (status = 429, description = OPERATOR_THROTTLED, body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
    ),
    security(("operatorToken" = []))
)]
pub async fn get_limits(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((org, project, env)): Path<(String, String, String)>,
) -> Result<Json<LimitsBody>, ApiError> {
    authorize(&state, &headers)?;
    apply(
        &state,
        format!("{org}/{project}/{env}"),
        SetLimits::default(),
    )
    .await
}

/// `PUT /api/v1/operator/environments/{org}/{project}/{env}/limits`
#[utoipa::path(
    put,
    path = "/api/v1/operator/environments/{org}/{project}/{env}/limits",
    operation_id = "putEnvironmentLimits",
    summary = "Set an environment's limits (operators): a field left out stays, null lifts the limit",
    params(EnvironmentPath),
    request_body = PutLimitsBody,
    responses(
        (status = 200, description = "the environment's limits after the change", body = LimitsBody),
        (status = 400, description = "a slug or a limit that is not valid (a limit is at least 1, or null for none)", body = ErrorBody),
        (status = 401, description = "no operator token, or not the one configured", body = ErrorBody),
        (status = 403, description = "the operator endpoints are off (OPERATOR_TOKEN is not set)", body = ErrorBody),
        (status = 404, description = "no such environment", body = ErrorBody),
        (status = 429, description = OPERATOR_THROTTLED, body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
    ),
    security(("operatorToken" = []))
)]
pub async fn put_limits(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((org, project, env)): Path<(String, String, String)>,
    ApiJson(body): ApiJson<PutLimitsBody>,
) -> Result<Json<LimitsBody>, ApiError> {
    authorize(&state, &headers)?;
    let set = SetLimits {
        max_jobs_in_flight: body.max_jobs_in_flight,
        max_events_per_second: body.max_events_per_second,
    };
    let path = format!("{org}/{project}/{env}");
    let shown = apply(&state, path, set).await?;
    tracing::info!(environment = %shown.environment, max_jobs_in_flight = ?shown.max_jobs_in_flight,
        max_events_per_second = ?shown.max_events_per_second, "environment limits set by an operator");
    Ok(shown)
}

async fn apply(
    state: &AppState,
    path: String,
    set: SetLimits,
) -> Result<Json<LimitsBody>, ApiError> {
    match tenants::limits(&state.pool, &path, set).await {
        Ok(Some(Limits {
            max_jobs_in_flight,
            max_events_per_second,
        })) => Ok(Json(LimitsBody {
            environment: path,
            max_jobs_in_flight,
            max_events_per_second,
        })),
        Ok(None) => Err(ApiError::not_found(format!("no environment {path}"))),
        Err(EnvironmentError::Db(e)) => Err(e.into()),
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    }
}

/// The caller bears the operator token; 403 when the endpoints are off, 401 for a wrong
/// or missing token. Admission (`super::admit`) checked it already, before the body, with
/// the failed attempts throttled; this is the handler's own check.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.operator_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the operator endpoints are off: set OPERATOR_TOKEN to turn them on",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Digests compared, so the time taken says nothing about the token's prefix.
    match given {
        Some(token) if tenants::hash_api_key(token).as_slice() == &expected[..] => Ok(()),
        _ => Err(ApiError::unauthorized(
            "an operator endpoint: send Authorization: Bearer <OPERATOR_TOKEN>",
        )),
    }
}

/// Failed operator-token attempts one client address may make in a window before its
/// attempts are refused (429) unchecked until the window ends.
pub const OPERATOR_FAILURES_PER_CLIENT: u32 = 10;
/// Failed attempts of every client together in a window before every attempt is refused
/// unchecked until the window ends.
pub const OPERATOR_FAILURES_IN_ALL: u32 = 100;
/// The window those counts are taken over.
pub const OPERATOR_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// At most this many client addresses are tracked; past it, ended windows are dropped.
const MAX_TRACKED_CLIENTS: usize = 10_000;

/// Failed attempts at the operator token, per client address and in all, in this process.
#[derive(Clone, Default)]
pub struct Throttle {
    state: Arc<Mutex<ThrottleState>>,
}

#[derive(Default)]
struct ThrottleState {
    by_client: HashMap<IpAddr, Window>,
    all: Option<Window>,
}

/// Failures counted since `since`.
#[derive(Clone, Copy)]
struct Window {
    since: Instant,
    failures: u32,
}

impl Window {
    /// How long until this window ends, if `limit` failures are in it and it has not.
    fn closed_for(&self, limit: u32, now: Instant) -> Option<Duration> {
        let ends = self.since + OPERATOR_FAILURE_WINDOW;
        (self.failures >= limit && now < ends).then(|| ends - now)
    }

    fn count(window: &mut Option<Window>, now: Instant) {
        match window {
            Some(w) if now < w.since + OPERATOR_FAILURE_WINDOW => w.failures += 1,
            _ => {
                *window = Some(Window {
                    since: now,
                    failures: 1,
                })
            }
        }
    }
}

impl Throttle {
    /// How long `client` must wait before its next attempt is checked, if it must.
    pub fn refused(&self, client: Option<IpAddr>, now: Instant) -> Option<Duration> {
        let state = self.state.lock().expect("throttle lock");
        let by_client = client
            .and_then(|c| state.by_client.get(&c))
            .and_then(|w| w.closed_for(OPERATOR_FAILURES_PER_CLIENT, now));
        let all = state
            .all
            .and_then(|w| w.closed_for(OPERATOR_FAILURES_IN_ALL, now));
        by_client.max(all)
    }

    /// Count a failed attempt of `client`.
    pub fn failed(&self, client: Option<IpAddr>, now: Instant) {
        let mut state = self.state.lock().expect("throttle lock");
        Window::count(&mut state.all, now);
        if let Some(c) = client {
            if state.by_client.len() >= MAX_TRACKED_CLIENTS && !state.by_client.contains_key(&c) {
                state
                    .by_client
                    .retain(|_, w| now < w.since + OPERATOR_FAILURE_WINDOW);
            }
            if state.by_client.len() < MAX_TRACKED_CLIENTS || state.by_client.contains_key(&c) {
                let mut w = state.by_client.get(&c).copied();
                Window::count(&mut w, now);
                if let Some(w) = w {
                    state.by_client.insert(c, w);
                }
            }
        }
    }
}

/// Admission's check of an operator route, before anything of the request's body is
/// read: 403 when the endpoints are off, 429 while the caller's failed attempts (or
/// everyone's) are over their limit (the token not even compared), 401 for a missing
/// token, and for a wrong one, counted.
pub fn admit(
    state: &AppState,
    headers: &HeaderMap,
    client: Option<IpAddr>,
) -> Result<(), ApiError> {
    if state.operator_token.is_none() || headers.get(header::AUTHORIZATION).is_none() {
        return authorize(state, headers);
    }
    let now = Instant::now();
    if let Some(wait) = state.operator_throttle.refused(client, now) {
        return Err(ApiError::too_many(
            format!(
                "too many failed attempts at the operator token (at most \
                 {OPERATOR_FAILURES_PER_CLIENT} per client and {OPERATOR_FAILURES_IN_ALL} in all \
                 per {} s); retry after {} s",
                OPERATOR_FAILURE_WINDOW.as_secs(),
                wait.as_secs().max(1)
            ),
            wait,
        ));
    }
    let checked = authorize(state, headers);
    if checked.is_err() {
        state.operator_throttle.failed(client, now);
        tracing::warn!(client = ?client, "a wrong operator token");
    }
    checked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_past_its_failures_waits_until_its_window_ends_and_others_do_not() {
        let throttle = Throttle::default();
        let (a, b) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        for _ in 0..OPERATOR_FAILURES_PER_CLIENT {
            assert_eq!(throttle.refused(Some(a), t0), None);
            throttle.failed(Some(a), t0);
        }
        let later = t0 + Duration::from_secs(15);
        assert_eq!(
            throttle.refused(Some(a), later),
            Some(OPERATOR_FAILURE_WINDOW - Duration::from_secs(15))
        );
        assert_eq!(throttle.refused(Some(b), later), None);
        assert_eq!(
            throttle.refused(Some(a), t0 + OPERATOR_FAILURE_WINDOW),
            None
        );
    }

    #[test]
    fn failures_in_all_hold_back_every_client() {
        let throttle = Throttle::default();
        let t0 = Instant::now();
        for i in 0..OPERATOR_FAILURES_IN_ALL {
            throttle.failed(Some(IpAddr::from([10, 0, (i / 256) as u8, i as u8])), t0);
        }
        assert!(
            throttle
                .refused(Some(IpAddr::from([10, 9, 9, 9])), t0)
                .is_some()
        );
        assert!(throttle.refused(None, t0).is_some());
        // A new window starts with the first failure after the last one ended.
        let next = t0 + OPERATOR_FAILURE_WINDOW;
        assert_eq!(throttle.refused(None, next), None);
        throttle.failed(None, next);
        assert_eq!(throttle.refused(None, next), None);
    }
}
