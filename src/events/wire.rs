//! The JSON of a send-event request and of its answer, as `POST /api/v1/events` and the
//! AMQP ingest exchange both carry them (trigger.dev v2's `SendEvent` body and
//! `ApiEventLog`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{EventRecord, SendEvent, SendEventOptions};
use crate::dates::iso;

/// `{"event": {...}, "options": {...}}`
#[derive(Debug, Deserialize, ToSchema)]
pub struct SendEventBody {
    pub event: EventBody,
    #[serde(default)]
    pub options: Option<OptionsBody>,
}

/// An event as a producer sends it.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(as = Event)]
pub struct EventBody {
    #[schema(min_length = 1, max_length = 255)]
    pub name: String,
    /// Any JSON; payload and context together at most 512 KiB.
    #[serde(default)]
    pub payload: Value,
    /// Any JSON.
    #[serde(default)]
    #[schema(value_type = Value)]
    pub context: Option<Value>,
    /// Idempotency key within the environment; generated when absent.
    #[serde(default)]
    #[schema(value_type = String, min_length = 1, max_length = 255)]
    pub id: Option<String>,
    #[serde(default)]
    #[schema(value_type = DateTime<Utc>)]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(default)]
    #[schema(value_type = String, min_length = 1, max_length = 255, default = "trigger.dev")]
    pub source: Option<String>,
    /// REQUEST: the payload is {url, method, headers, rawBody}; filters see the parsed body
    /// when the content-type is JSON.
    #[serde(default, rename = "payloadType")]
    #[schema(value_type = PayloadType, inline, default = "JSON")]
    pub payload_type: Option<String>,
}

/// How an event's payload is read: `JSON` (the default) or `REQUEST`.
#[derive(ToSchema)]
#[allow(dead_code)]
enum PayloadType {
    #[schema(rename = "JSON")]
    Json,
    #[schema(rename = "REQUEST")]
    Request,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = SendEventOptions)]
pub struct OptionsBody {
    /// Wins over deliverAfter; in the past means now.
    #[serde(default)]
    #[schema(value_type = DateTime<Utc>)]
    pub deliver_at: Option<DateTime<Utc>>,
    /// Whole seconds.
    #[serde(default)]
    #[schema(value_type = u64, minimum = 0, maximum = 315360000)]
    pub deliver_after: Option<u64>,
    #[serde(default)]
    #[schema(value_type = String, min_length = 1, max_length = 255)]
    pub account_id: Option<String>,
}

impl OptionsBody {
    /// The ingest options, carrying the request's trace (a W3C `traceparent`).
    pub fn into_options(self, trace_parent: String) -> SendEventOptions {
        SendEventOptions {
            deliver_at: self.deliver_at,
            deliver_after: self.deliver_after,
            account_id: self.account_id,
            trace_parent: Some(trace_parent),
        }
    }
}

impl From<EventBody> for SendEvent {
    fn from(e: EventBody) -> Self {
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
}

/// Largest body of one send (2 MiB, axum's default), over HTTP or as an AMQP message; the
/// event's payload and context are then held to [`super::MAX_PAYLOAD_BYTES`].
pub const MAX_SEND_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The prefix of the message that a body of the wrong shape gets (axum's words, which the
/// HTTP API answers with).
pub const WRONG_SHAPE: &str = "Failed to deserialize the JSON body into the target type";

/// trigger.dev's ApiEventLog: the answer to a send.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiEventLog {
    /// The producer's id.
    pub id: String,
    pub name: String,
    pub payload: Value,
    pub context: Value,
    #[schema(value_type = DateTime<Utc>)]
    pub timestamp: String,
    #[schema(value_type = DateTime<Utc>)]
    pub deliver_at: String,
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub delivered_at: Option<String>,
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub cancelled_at: Option<String>,
}

impl From<&EventRecord> for ApiEventLog {
    fn from(r: &EventRecord) -> Self {
        Self {
            id: r.event_id.clone(),
            name: r.name.clone(),
            payload: r.payload.clone(),
            context: r.context.clone(),
            timestamp: iso(r.timestamp),
            deliver_at: iso(r.deliver_at),
            delivered_at: r.delivered_at.map(iso),
            cancelled_at: r.cancelled_at.map(iso),
        }
    }
}

/// trigger.dev's ApiEventLog as JSON (the AMQP ingest's replies carry it).
pub fn event_log(r: &EventRecord) -> Value {
    serde_json::to_value(ApiEventLog::from(r)).expect("serializes")
}

/// The message of a JSON text nested past what the parser takes (serde_json stops at 128
/// levels, `error` says "recursion limit exceeded"), or `None` for any other error: such a
/// text is past the depth limit, and is refused for it.
pub fn too_deep(error: &str) -> Option<String> {
    error.contains("recursion limit exceeded").then(|| {
        format!(
            "the JSON nests arrays and objects too deep: payload and context may nest at \
             most {} levels deep",
            super::MAX_JSON_DEPTH
        )
    })
}

/// The message a JSON text with a NUL character gets: Postgres stores none, in text or in
/// jsonb.
pub const NUL_REFUSED: &str = "strings must not contain the NUL character (\\u0000)";

/// Whether a JSON text holds a NUL character: in valid JSON it can only be the escape
/// `\u0000` (an odd number of backslashes before `u0000`; `\\u0000` is a backslash and
/// text).
pub fn has_escaped_nul(json: &[u8]) -> bool {
    let mut i = 0;
    while let Some(at) = json[i..].windows(5).position(|w| w == b"u0000") {
        let u = i + at;
        let slashes = json[..u].iter().rev().take_while(|b| **b == b'\\').count();
        if slashes % 2 == 1 {
            return true;
        }
        i = u + 5;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::has_escaped_nul;

    #[test]
    fn finds_nul_escapes_and_only_them() {
        assert!(has_escaped_nul(br#"{"a":"x\u0000y"}"#));
        assert!(has_escaped_nul(br#"{"\u0000":1}"#));
        assert!(has_escaped_nul(br#"["\\\u0000"]"#));
        assert!(!has_escaped_nul(br#"{"a":"\\u0000"}"#));
        assert!(!has_escaped_nul(br#"{"a":"u0000"}"#));
    }
}
