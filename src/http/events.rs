//! Event routes: send, get, cancel.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
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

/// `POST /api/v1/events`
pub async fn send_event(
    State(state): State<AppState>,
    AuthEnv(env): AuthEnv,
    headers: HeaderMap,
    ApiJson(body): ApiJson<SendEventBody>,
) -> Result<Json<Value>, ApiError> {
    let options = body.options.unwrap_or_default();
    let e = body.event;
    // Continue the caller's trace, or start one.
    let trace = headers
        .get("traceparent")
        .and_then(|h| h.to_str().ok())
        .and_then(TraceParent::parse)
        .map(|t| t.child())
        .unwrap_or_else(TraceParent::new_root);
    let result = state
        .events
        .ingest_send_event(
            &env,
            SendEvent {
                id: e.id,
                name: e.name,
                payload: e.payload,
                context: e.context,
                timestamp: e.timestamp,
                source: e.source,
            },
            SendEventOptions {
                deliver_at: options.deliver_at,
                deliver_after: options.deliver_after,
                account_id: options.account_id,
                trace_parent: Some(trace.to_string()),
            },
        )
        .await
        .map_err(|e| match e {
            IngestError::Invalid(m) => ApiError::bad_request(m),
            IngestError::Db(e) => ApiError::internal(e),
            IngestError::Unavailable => {
                ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            }
        })?;
    tracing::info!(
        event_id = %result.record.event_id,
        environment = %env.id,
        trace_id = %trace.trace_id,
        created = result.created,
        "event accepted"
    );
    Ok(Json(event_log(&result.record)))
}

/// `GET /api/v2/events/{eventId}`
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
