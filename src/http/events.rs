//! Event routes: send, bulk send, get, cancel, cancel runs.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::AuthEnv;
use super::error::{ApiError, ApiJson};
use super::{AppState, iso};
use crate::events::{EventRecord, IngestError, SendEvent, SendEventOptions};
use crate::trace::TraceParent;

#[derive(Debug, Deserialize)]
pub struct SendEventBody {
    pub event: EventBody,
    #[serde(default)]
    pub options: Option<OptionsBody>,
}

#[derive(Debug, Deserialize)]
pub struct EventBody {
    pub name: String,
    #[serde(default)]
    pub payload: Value,
    #[serde(default)]
    pub context: Option<Value>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(default)]
    pub source: Option<String>,
    /// `JSON` (the default) or `REQUEST` (a payload of url, method, headers, rawBody).
    #[serde(default, rename = "payloadType")]
    pub payload_type: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OptionsBody {
    #[serde(default)]
    pub deliver_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub deliver_after: Option<u64>,
    #[serde(default)]
    pub account_id: Option<String>,
}

impl OptionsBody {
    /// The ingest options, carrying the request's trace.
    fn into_options(self, trace: &TraceParent) -> SendEventOptions {
        SendEventOptions {
            deliver_at: self.deliver_at,
            deliver_after: self.deliver_after,
            account_id: self.account_id,
            trace_parent: Some(trace.to_string()),
        }
    }
}

/// `POST /api/v1/events`
pub async fn send_event(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SendEventBody>,
) -> Result<Json<Value>, ApiError> {
    let options = body.options.unwrap_or_default();
    let trace = trace_of(&headers);
    let result = state
        .events
        .ingest_send_event(
            &env,
            send_event_of(body.event),
            options.into_options(&trace),
        )
        .await
        .map_err(ingest_error)?;
    tracing::info!(
        event_id = %result.record.event_id,
        environment = %env.id,
        trace_id = %trace.trace_id,
        created = result.created,
        "event accepted"
    );
    Ok(Json(event_log(&result.record)))
}

fn ingest_error(e: IngestError) -> ApiError {
    match e {
        IngestError::Invalid(m) => ApiError::bad_request(m),
        IngestError::TooLarge(m) => ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, m),
        IngestError::Db(e) => ApiError::internal(e),
        IngestError::Unavailable => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
    }
}

fn send_event_of(e: EventBody) -> SendEvent {
    SendEvent {
        id: e.id,
        name: e.name,
        payload: e.payload,
        context: e.context,
        timestamp: e.timestamp,
        source: e.source,
        payload_type: e.payload_type,
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

#[derive(Debug, Deserialize)]
pub struct BulkBody {
    pub events: Vec<EventBody>,
    #[serde(default)]
    pub options: Option<OptionsBody>,
}

/// `POST /api/v1/events/bulk`: every event stored in one transaction, or none.
pub async fn send_events(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    headers: HeaderMap,
    ApiJson(body): ApiJson<BulkBody>,
) -> Result<Json<Value>, ApiError> {
    let options = body.options.unwrap_or_default();
    let trace = trace_of(&headers);
    let n = body.events.len();
    let results = state
        .events
        .ingest_bulk(
            &env,
            body.events.into_iter().map(send_event_of).collect(),
            options.into_options(&trace),
        )
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
    let (cancelled, failed) = state
        .events
        .cancel_runs(&env, &event_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("event {event_id:?} not found")))?;
    Ok(Json(
        json!({"cancelledRunIds": cancelled, "failedToCancelRunIds": failed}),
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

/// trigger.dev's ApiEventLog.
pub fn event_log(r: &EventRecord) -> Value {
    json!({
        "id": r.event_id,
        "name": r.name,
        "payload": r.payload,
        "context": r.context,
        "timestamp": iso(r.timestamp),
        "deliverAt": iso(r.deliver_at),
        "deliveredAt": r.delivered_at.map(iso),
        "cancelledAt": r.cancelled_at.map(iso),
    })
}
