//! Event routes: send, bulk send, get, cancel, cancel runs.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::AppState;
use super::auth::AuthEnv;
use super::error::{ApiError, ApiJson, JsonText};
use crate::dates::iso;
use crate::events::wire::{
    EventBody, OptionsBody, SendEventBody, WRONG_SHAPE, event_log, too_deep,
};
use crate::events::{IngestError, MAX_BULK_EVENTS, MAX_PAYLOAD_BYTES};
use crate::tenants::Environment;
use crate::trace::TraceParent;

/// `POST /api/v1/events`
pub async fn send_event(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SendEventBody>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(event_log(&result.record)))
}

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
#[derive(Debug, Deserialize)]
struct BulkBody<'a> {
    #[serde(borrow, deserialize_with = "at_most_bulk_events")]
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
pub async fn send_events(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    headers: HeaderMap,
    JsonText(text): JsonText,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(Value::Array(
        results.iter().map(|r| event_log(&r.record)).collect(),
    )))
}

/// `POST /api/v1/events/{eventId}/cancel-runs`: runs still QUEUED become CANCELED.
pub async fn cancel_runs(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(event_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let cancelled = state
        .events
        .cancel_runs(&env, &event_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {event_id:?} not found")))?;
    // trigger.dev's shape: a run here is either QUEUED (and cancelled) or has moved on, so
    // none fails to cancel.
    Ok(Json(
        json!({"cancelledRunIds": cancelled, "failedToCancelRunIds": []}),
    ))
}

/// `GET /api/v1/events/{eventId}` and `GET /api/v2/events/{eventId}`
pub async fn get_event_v2(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(event_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (record, runs) = state
        .events
        .get_event(&env, &event_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {event_id:?} not found")))?;
    let runs: Vec<Value> = runs
        .iter()
        .map(|r| {
            json!({
                "id": r.id,
                "status": r.status,
                "startedAt": r.started_at.map(iso),
                "completedAt": r.completed_at.map(iso),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": record.event_id,
        "name": record.name,
        "createdAt": iso(record.created_at),
        "updatedAt": iso(record.updated_at),
        "runs": runs,
    })))
}

/// `POST /api/v1/events/{eventId}/cancel`: the event log as it stands after the cancel.
pub async fn cancel_event(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    Path(event_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = state
        .events
        .cancel_event(&env, &event_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {event_id:?} not found")))?;
    Ok(Json(event_log(&record)))
}
