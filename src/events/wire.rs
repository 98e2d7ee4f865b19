//! The JSON of a send-event request and of its answer, as `POST /api/v1/events` and the
//! AMQP ingest exchange both carry them (trigger.dev v2's `SendEvent` body and
//! `ApiEventLog`).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{EventRecord, SendEvent, SendEventOptions};
use crate::dates::iso;

/// `{"event": {...}, "options": {...}}`
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
