//! Event routes: send, bulk send, list, get, cancel, cancel runs.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::AppState;
use super::auth::AuthEnv;
use super::error::{ApiError, ApiJson, ErrorBody, JsonText};
use crate::dates::iso;
use crate::events::list::{self, Cursor, EventFilter, EventState, ListedEvent};
use crate::events::wire::{
    ApiEventLog, EventBody, NUL_REFUSED, OptionsBody, SendEventBody, WRONG_SHAPE, too_deep,
};
use crate::events::{IngestError, MAX_BULK_EVENTS, MAX_PAYLOAD_BYTES};
use crate::tenants::Environment;
use crate::trace::TraceParent;

/// `POST /api/v1/events`
#[utoipa::path(
    post,
    path = "/api/v1/events",
    operation_id = "sendEvent",
    summary = "Send an event (idempotent on its id)",
    request_body = SendEventBody,
    responses(
        (status = 200, description = "OK", body = ApiEventLog),
        (status = 429, description = RATE_LIMITED, body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
    ),
    security(("bearerAuth" = []))
)]
pub async fn send_event(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SendEventBody>,
) -> Result<Json<ApiEventLog>, ApiError> {
    within_rate(&state, &env, 1)?;
    let options = body.options.unwrap_or_default();
    let trace = trace_of(&headers);
    let result = state
        .events
        .ingest_send_event(
            &env,
            body.event.into(),
            options.into_options(trace.to_string()),
        )
        .await
        .map_err(ingest_error)?;
    // The id is the caller's text: `?` escapes it, so it cannot forge log lines.
    tracing::info!(
        event_id = ?result.record.event_id,
        environment = %env.id,
        trace_id = %trace.trace_id,
        created = result.created,
        "event accepted"
    );
    Ok(Json(ApiEventLog::from(&result.record)))
}

/// The 429 of the routes that store events.
const RATE_LIMITED: &str = "the environment is over its ingest rate (`max_events_per_second`); \
     nothing was stored; or the environment has as many requests in flight as it may \
     (`HTTP_MAX_IN_FLIGHT_PER_ENVIRONMENT`)";

/// Take `n` events of the environment's ingest allowance, or answer `429` with
/// `Retry-After` (the v2 SDK retries it).
fn within_rate(state: &AppState, env: &Environment, n: usize) -> Result<(), ApiError> {
    let Some(rate) = env.max_events_per_second else {
        return Ok(());
    };
    let rate = u32::try_from(rate).unwrap_or(1);
    state
        .limiter
        .take(env.id, rate, n, std::time::Instant::now())
        .map_err(|wait| {
            crate::metrics::metrics()
                .events_rate_limited
                .with_label_values(&["http"])
                .inc_by(n as u64);
            ApiError::too_many(
                format!(
                    "this environment may send {rate} events per second; retry after {:.1} s",
                    wait.as_secs_f64()
                ),
                wait,
            )
        })
}

fn ingest_error(e: IngestError) -> ApiError {
    match e {
        IngestError::Invalid(m) => ApiError::bad_request(m),
        IngestError::TooLarge(m) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, m),
        IngestError::Db(e) => ApiError::internal(e),
        IngestError::Internal(e) => ApiError::internal(e),
        IngestError::Unavailable => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    }
}

/// The caller's trace continued, or a new one.
fn trace_of(headers: &HeaderMap) -> TraceParent {
    headers
        .get("traceparent")
        .and_then(|h| h.to_str().ok())
        .and_then(TraceParent::parse)
        .map(|t| t.child())
        .unwrap_or_else(TraceParent::new_root)
}

/// A bulk body as first read: each event still JSON text, borrowed from the body, so its
/// size is checked before anything of it is built.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(
    as = SendEventsBody,
    description = "Up to 100 events, stored in one transaction, or none"
)]
struct BulkBody<'a> {
    #[serde(borrow, deserialize_with = "at_most_bulk_events")]
    #[schema(value_type = Vec<EventBody>, max_items = 100)]
    events: Vec<&'a RawValue>,
    #[serde(default)]
    options: Option<OptionsBody>,
}

/// The JSON text of one event of a bulk send may hold this much beyond its payload and
/// context: name, id, source and the keys around them.
const BULK_EVENT_ENVELOPE_BYTES: usize = 64 * 1024;

/// Reads the `events` list, refusing it at its 101st member rather than after the last.
fn at_most_bulk_events<'de, D>(d: D) -> Result<Vec<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Events;
    impl<'de> serde::de::Visitor<'de> for Events {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_BULK_EVENTS} events")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut events = Vec::new();
            while let Some(e) = seq.next_element::<&'de RawValue>()? {
                if events.len() == MAX_BULK_EVENTS {
                    return Err(serde::de::Error::custom(format!(
                        "events: at most {MAX_BULK_EVENTS} per call"
                    )));
                }
                events.push(e);
            }
            Ok(events)
        }
    }
    d.deserialize_seq(Events)
}

/// `POST /api/v1/events/bulk`: every event stored in one transaction, or none. Each event's
/// JSON text is held to the one-event size limit before it is parsed, so a body costs
/// memory in proportion to what is accepted.
#[utoipa::path(
    post,
    path = "/api/v1/events/bulk",
    operation_id = "sendEvents",
    summary = "Send up to 100 events in one transaction",
    request_body = BulkBody,
    responses(
        (status = 200, description = "OK", body = Vec<ApiEventLog>),
        (status = 429, description = RATE_LIMITED, body = ErrorBody, headers(("Retry-After" = u64, description = "seconds to wait before retrying"))),
    ),
    security(("bearerAuth" = []))
)]
pub async fn send_events(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    headers: HeaderMap,
    JsonText(text): JsonText,
) -> Result<Json<Vec<ApiEventLog>>, ApiError> {
    let body: BulkBody = serde_json::from_slice(&text).map_err(|e| {
        ApiError::bad_request(too_deep(&e.to_string()).unwrap_or(format!("{WRONG_SHAPE}: {e}")))
    })?;
    let mut events = Vec::with_capacity(body.events.len());
    for (i, raw) in body.events.iter().enumerate() {
        let len = raw.get().len();
        if len > MAX_PAYLOAD_BYTES + BULK_EVENT_ENVELOPE_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "events[{i}]: its JSON is {len} bytes; at most {} are accepted per event \
                     (payload and context at most {MAX_PAYLOAD_BYTES})",
                    MAX_PAYLOAD_BYTES + BULK_EVENT_ENVELOPE_BYTES
                ),
            ));
        }
        let event: EventBody = serde_json::from_str(raw.get()).map_err(|e| {
            let e = e.to_string();
            ApiError::bad_request(format!("events[{i}]: {}", too_deep(&e).unwrap_or(e)))
        })?;
        events.push(event.into());
    }
    let options = body.options.unwrap_or_default();
    let trace = trace_of(&headers);
    let n = events.len();
    within_rate(&state, &env, n)?;
    let results = state
        .events
        .ingest_bulk(&env, events, options.into_options(trace.to_string()))
        .await
        .map_err(ingest_error)?;
    crate::metrics::metrics()
        .events_ingested
        .with_label_values(&["bulk"])
        .inc_by(n as u64);
    tracing::info!(events = n, environment = %env.id, trace_id = %trace.trace_id, "events accepted");
    Ok(Json(
        results
            .iter()
            .map(|r| ApiEventLog::from(&r.record))
            .collect(),
    ))
}

/// The runs a cancel-runs call cancelled, and those it could not.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = CancelRunsForEvent)]
pub struct CancelledRuns {
    pub cancelled_run_ids: Vec<Uuid>,
    pub failed_to_cancel_run_ids: Vec<Uuid>,
}

/// `POST /api/v1/events/{eventId}/cancel-runs`: runs still QUEUED become CANCELED.
#[utoipa::path(
    post,
    path = "/api/v1/events/{eventId}/cancel-runs",
    operation_id = "cancelRunsForEvent",
    summary = "Cancel an event's runs still QUEUED",
    params(EventIdParam),
    responses(
        (status = 200, description = "OK", body = CancelledRuns),
        (status = 404, description = "no such event in this environment", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn cancel_runs(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(event_id): Path<String>,
) -> Result<Json<CancelledRuns>, ApiError> {
    let cancelled = state
        .events
        .cancel_runs(&env, &event_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {event_id:?} not found")))?;
    // trigger.dev's shape: a run here is either QUEUED (and cancelled) or has moved on, so
    // none fails to cancel.
    Ok(Json(CancelledRuns {
        cancelled_run_ids: cancelled,
        failed_to_cancel_run_ids: Vec::new(),
    }))
}

/// The event a route names, by the producer's id.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Path, rename_all = "camelCase")]
pub struct EventIdParam {
    /// The producer's id
    #[param(min_length = 1, max_length = 255)]
    pub event_id: String,
}

/// An event and its runs.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = GetEvent)]
pub struct EventWithRuns {
    pub id: String,
    pub name: String,
    #[schema(value_type = DateTime<Utc>)]
    pub created_at: String,
    #[schema(value_type = DateTime<Utc>)]
    pub updated_at: String,
    pub runs: Vec<RunBody>,
}

/// A run an event's delivery created.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = Run)]
pub struct RunBody {
    pub id: Uuid,
    /// `QUEUED` until the runs service takes it over (or `CANCELED`).
    pub status: String,
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub started_at: Option<String>,
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub completed_at: Option<String>,
}

/// `GET /api/v1/events/{eventId}`
#[utoipa::path(
    get,
    path = "/api/v1/events/{eventId}",
    operation_id = "getEventV1",
    summary = "An event and its runs",
    params(EventIdParam),
    responses(
        (status = 200, description = "OK", body = EventWithRuns),
        (status = 404, description = "no such event in this environment", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn get_event_v1(
    state: State<AppState>,
    env: AuthEnv,
    event_id: Path<String>,
) -> Result<Json<EventWithRuns>, ApiError> {
    get_event_v2(state, env, event_id).await
}

/// `GET /api/v2/events/{eventId}` (and `GET /api/v1/events/{eventId}`, the same)
#[utoipa::path(
    get,
    path = "/api/v2/events/{eventId}",
    operation_id = "getEvent",
    summary = "An event and its runs",
    params(EventIdParam),
    responses(
        (status = 200, description = "OK", body = EventWithRuns),
        (status = 404, description = "no such event in this environment", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn get_event_v2(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(event_id): Path<String>,
) -> Result<Json<EventWithRuns>, ApiError> {
    let (record, runs) = state
        .events
        .get_event(&env, &event_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {event_id:?} not found")))?;
    let runs = runs
        .into_iter()
        .map(|r| RunBody {
            id: r.id,
            status: r.status,
            started_at: r.started_at.map(iso),
            completed_at: r.completed_at.map(iso),
        })
        .collect();
    Ok(Json(EventWithRuns {
        id: record.event_id,
        name: record.name,
        created_at: iso(record.created_at),
        updated_at: iso(record.updated_at),
        runs,
    }))
}

/// `POST /api/v1/events/{eventId}/cancel`: the event log as it stands after the cancel.
#[utoipa::path(
    post,
    path = "/api/v1/events/{eventId}/cancel",
    operation_id = "cancelEvent",
    summary = "Cancel an event not yet delivered",
    params(EventIdParam),
    responses(
        (status = 200, description = "OK", body = ApiEventLog),
        (status = 404, description = "no such event in this environment", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn cancel_event(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(event_id): Path<String>,
) -> Result<Json<ApiEventLog>, ApiError> {
    let record = state
        .events
        .cancel_event(&env, &event_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {event_id:?} not found")))?;
    Ok(Json(ApiEventLog::from(&record)))
}

/// The query of `GET /api/v1/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only events of this name.
    #[serde(default)]
    pub name: Option<String>,
    /// Only events whose timestamp is at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    /// Only events whose timestamp is before this time (RFC 3339).
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// Only events in this state.
    #[serde(default)]
    pub state: Option<EventState>,
    /// Events per page (default 50).
    #[serde(default)]
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
    /// The `next` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// A page of an environment's events.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Events)]
pub struct EventPage {
    /// Newest first: by timestamp, then by id.
    pub events: Vec<ListedEvent>,
    /// Pass as `cursor` for the next page; null on the last.
    #[schema(required)]
    pub next: Option<String>,
}

/// `GET /api/v1/events?name=&since=&until=&state=&limit=&cursor=`: the environment's
/// events, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/api/v1/events",
    operation_id = "listEvents",
    summary = "The environment's events, newest first, a page at a time",
    params(ListQuery),
    responses(
        (status = 200, description = "OK", body = EventPage),
        (status = 400, description = "a query parameter that is not valid (a limit outside 1..=500, a cursor no page handed out)", body = ErrorBody),
    ),
    security(("bearerAuth" = []))
)]
pub async fn list_events(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let Query(query) = query.map_err(|r| ApiError::bad_request(r.body_text()))?;
    if query.name.as_deref().is_some_and(|n| n.contains('\0')) {
        return Err(ApiError::bad_request(NUL_REFUSED));
    }
    let limit = query.limit.unwrap_or(list::DEFAULT_LIMIT);
    if !(1..=list::MAX_LIMIT).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit: between 1 and {} events per page",
            list::MAX_LIMIT
        )));
    }
    let cursor = match query.cursor.as_deref() {
        Some(text) => Some(Cursor::decode(text).ok_or_else(|| {
            ApiError::bad_request("cursor: not one a page of this listing handed out")
        })?),
        None => None,
    };
    let filter = EventFilter {
        name: query.name,
        since: query.since,
        until: query.until,
        state: query.state,
        limit,
        cursor,
    };
    let page = list::list_events(&state.pool, env.id, &filter).await?;
    let now = page.now;
    Ok(Json(EventPage {
        events: page
            .events
            .into_iter()
            .map(|e| ListedEvent::new(e, now))
            .collect(),
        next: page.next.map(|c| c.encode()),
    }))
}
