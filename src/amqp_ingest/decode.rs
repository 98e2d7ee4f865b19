//! Reading a send-event request off an AMQP message, in any of its three forms: native
//! (the body of `POST /api/v1/events`), CloudEvents binary (attributes in `cloudEvents_`
//! or `cloudEvents:` headers as the CloudEvents AMQP binding writes them, or in `ce-`
//! headers as the RabbitMQ binding of the CloudEvents SDKs does; the body is the data) and
//! CloudEvents structured (`application/cloudevents+json`). Pure: no I/O; the contract is
//! `rabbitmq/schemas/README.md`.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::amqp::message::{header_int as int, header_text as text};
use crate::events::wire::{NUL_REFUSED, SendEventBody, WRONG_SHAPE, has_escaped_nul, too_deep};
use crate::events::{SendEvent, SendEventOptions};
use crate::trace::TraceParent;

/// The header that carries the environment's API key.
pub const API_KEY_HEADER: &str = "x-kongflow-api-key";
/// The header that names the contract version of a native message (absent: 1).
pub const VERSION_HEADER: &str = "x-kongflow-version";
/// The one contract version this build reads.
pub const CONTRACT_VERSION: i64 = 1;
/// Largest message body accepted: an HTTP send's.
pub const MAX_MESSAGE_BYTES: usize = crate::events::wire::MAX_SEND_BODY_BYTES;
/// The CloudEvents version this build reads.
pub const CLOUDEVENTS_VERSION: &str = "1.0";
/// CloudEvents extension attributes that carry the send options.
const CE_DELIVER_AT: &str = "deliverat";
const CE_DELIVER_AFTER: &str = "deliverafter";
const CE_ACCOUNT_ID: &str = "accountid";

/// Why a message could not be stored: the label of the rejection metric and of the
/// rejected copy's `x-kongflow-reason` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    BadJson,
    BadShape,
    MissingKey,
    Unauthorized,
    TooLarge,
    Invalid,
    UnknownVersion,
    UnsupportedContentType,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::BadJson,
        Reason::BadShape,
        Reason::MissingKey,
        Reason::Unauthorized,
        Reason::TooLarge,
        Reason::Invalid,
        Reason::UnknownVersion,
        Reason::UnsupportedContentType,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadJson => "bad_json",
            Reason::BadShape => "bad_shape",
            Reason::MissingKey => "missing_key",
            Reason::Unauthorized => "unauthorized",
            Reason::TooLarge => "too_large",
            Reason::Invalid => "invalid",
            Reason::UnknownVersion => "unknown_version",
            Reason::UnsupportedContentType => "unsupported_content_type",
        }
    }

    /// The HTTP status the API answers the same fault with; replies carry it.
    pub fn status(self) -> u16 {
        match self {
            Reason::MissingKey | Reason::Unauthorized => 401,
            Reason::TooLarge => 413,
            Reason::UnsupportedContentType => 415,
            Reason::BadJson | Reason::BadShape | Reason::Invalid | Reason::UnknownVersion => 400,
        }
    }
}

/// A message that cannot be stored, and what to tell its producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// An API key as a message carried it. Its `Debug` shows nothing of it, so no log line
/// can print it by accident.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

/// What a message asks for: its key (checked by the caller against the database) and the
/// send, or why it cannot be read.
#[derive(Debug)]
pub struct Request {
    pub api_key: Option<ApiKey>,
    pub send: Result<(SendEvent, SendEventOptions), Rejection>,
}

/// Read a message.
pub fn decode(properties: &BasicProperties, body: &[u8]) -> Request {
    let empty = FieldTable::default();
    let headers = properties.headers().as_ref().unwrap_or(&empty);
    let api_key = header(headers, API_KEY_HEADER)
        .and_then(text)
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .map(ApiKey);
    Request {
        api_key,
        send: send_of(properties, headers, body),
    }
}

/// The properties of a copy of a message: the API key removed, all else kept.
pub fn without_key(properties: &BasicProperties) -> BasicProperties {
    let Some(headers) = properties.headers() else {
        return properties.clone();
    };
    let kept: BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(k, _)| !k.as_str().eq_ignore_ascii_case(API_KEY_HEADER))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    properties.clone().with_headers(FieldTable::from(kept))
}

fn send_of(
    properties: &BasicProperties,
    headers: &FieldTable,
    body: &[u8],
) -> Result<(SendEvent, SendEventOptions), Rejection> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!(
                "the message body is {} bytes; at most {MAX_MESSAGE_BYTES} are accepted",
                body.len()
            ),
        ));
    }
    if let Some(v) = header(headers, VERSION_HEADER) {
        match int(v) {
            Some(CONTRACT_VERSION) => {}
            _ => {
                return Err(Rejection::new(
                    Reason::UnknownVersion,
                    format!(
                        "{VERSION_HEADER} {} is not a version this service reads; it reads {CONTRACT_VERSION}",
                        shown(v)
                    ),
                ));
            }
        }
    }
    let trace = header(headers, "traceparent")
        .and_then(text)
        .and_then(|t| TraceParent::parse(&t))
        .map(|t| t.child())
        .unwrap_or_else(TraceParent::new_root)
        .to_string();
    let full_type = properties
        .content_type()
        .as_ref()
        .map(|c| c.as_str().to_string());
    let content_type = full_type.as_deref().map(essence);
    let binary: BTreeMap<String, &AMQPValue> = headers
        .inner()
        .iter()
        .filter_map(|(k, v)| cloud_event_attribute(k.as_str()).map(|a| (a, v)))
        .collect();
    if !binary.is_empty() {
        // The AMQP binding carries the data's type in a `content-type` application
        // property: a client that sends those as headers puts it here.
        let full_type = full_type.or_else(|| header(headers, "content-type").and_then(text));
        return binary_cloud_event(binary, full_type.as_deref(), body, trace);
    }
    match content_type.as_deref() {
        Some("application/cloudevents+json") => structured_cloud_event(body, trace),
        Some("application/cloudevents-batch+json") => Err(Rejection::new(
            Reason::UnsupportedContentType,
            "batched CloudEvents are not accepted: publish one event per message",
        )),
        None => native(properties, body, trace),
        Some(t) if is_json(t) => native(properties, body, trace),
        Some(t) => Err(Rejection::new(
            Reason::UnsupportedContentType,
            format!(
                "content_type {t:?} is not accepted: use application/json (a send-event body), \
                 application/cloudevents+json, or CloudEvents binary headers"
            ),
        )),
    }
}

/// The native form: `{"event": {...}, "options": {...}}`, as `POST /api/v1/events` takes it.
fn native(
    properties: &BasicProperties,
    body: &[u8],
    trace: String,
) -> Result<(SendEvent, SendEventOptions), Rejection> {
    if has_escaped_nul(body) {
        return Err(Rejection::new(Reason::Invalid, NUL_REFUSED));
    }
    // Read as JSON first: a body cut short is not JSON, whatever shape it began (the typed
    // read would stop at the first field of the wrong type and call it a shape error).
    let not_json = |e: serde_json::Error| {
        unparsed(
            &e,
            Reason::BadJson,
            format!("Failed to parse the request body as JSON: {e}"),
        )
    };
    serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(not_json)?;
    let parsed: SendEventBody = serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => {
            unparsed(&e, Reason::BadShape, format!("{WRONG_SHAPE}: {e}"))
        }
        _ => not_json(e),
    })?;
    let mut event: SendEvent = parsed.event.into();
    let message_id = properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_string());
    match (&event.id, message_id) {
        (Some(id), Some(m)) if *id != m => {
            return Err(Rejection::new(
                Reason::BadShape,
                format!("message_id {m:?} and event.id {id:?} differ: set one, or both alike"),
            ));
        }
        (None, Some(m)) if !m.is_empty() => event.id = Some(m),
        (None, _) => event.id = Some(derived_id(body)),
        _ => {}
    }
    let options = parsed.options.unwrap_or_default().into_options(trace);
    Ok((event, options))
}

/// A JSON text that does not parse: refused for the depth limit (`invalid`) when it nests
/// past what the parser takes, else for `reason`, with `message`.
fn unparsed(e: &serde_json::Error, reason: Reason, message: String) -> Rejection {
    match too_deep(&e.to_string()) {
        Some(m) => Rejection::new(Reason::Invalid, m),
        None => Rejection::new(reason, message),
    }
}

/// The id of a native message that names none: derived from its body, so a message the
/// broker delivers twice, or a producer publishes again after a lost confirm, is one event.
fn derived_id(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("amqp-{hex}")
}

/// The attribute a CloudEvents binary-mode header carries, lower-cased: `cloudEvents_type`,
/// `cloudEvents:type` and `ce-type` are all `type`.
fn cloud_event_attribute(header: &str) -> Option<String> {
    let lower = header.to_ascii_lowercase();
    lower
        .strip_prefix("cloudevents_")
        .or_else(|| lower.strip_prefix("cloudevents:"))
        .or_else(|| lower.strip_prefix("ce-"))
        .filter(|a| !a.is_empty())
        .map(str::to_string)
}

fn binary_cloud_event(
    attributes: BTreeMap<String, &AMQPValue>,
    full_type: Option<&str>,
    body: &[u8],
    trace: String,
) -> Result<(SendEvent, SendEventOptions), Rejection> {
    let mut attrs = Map::new();
    for (name, value) in attributes {
        let value = match (name.as_str(), value) {
            // The AMQP binding writes times as AMQP 1.0 timestamps: milliseconds since the
            // epoch, which arrive over AMQP 0-9-1 as plain integers.
            ("time" | CE_DELIVER_AT, v) if !matches!(v, AMQPValue::Timestamp(_)) => {
                match int(v).filter(|_| text(v).is_none()) {
                    Some(ms) => Utc
                        .timestamp_millis_opt(ms)
                        .single()
                        .map_or(Value::Null, |t| Value::String(t.to_rfc3339())),
                    None => json_of(v),
                }
            }
            (_, v) => json_of(v),
        };
        attrs.insert(name, value);
    }
    let content_type = full_type.map(essence);
    let data = match content_type.as_deref() {
        None if body.is_empty() => Value::Null,
        None => json_data(body)?,
        Some(t) if is_json(t) => json_data(body)?,
        Some(t) if t.starts_with("text/") => {
            let s = std::str::from_utf8(body).map_err(|_| {
                Rejection::new(Reason::BadShape, format!("{t} data is not UTF-8 text"))
            })?;
            if s.contains('\0') {
                return Err(Rejection::new(Reason::Invalid, NUL_REFUSED));
            }
            Value::String(s.to_string())
        }
        Some(t) => {
            return Err(Rejection::new(
                Reason::UnsupportedContentType,
                format!("a CloudEvent's data must be JSON or text, not {t:?}"),
            ));
        }
    };
    if let Some(t) = full_type {
        attrs.insert("datacontenttype".into(), Value::String(t.to_string()));
    }
    from_cloud_event(attrs, data, "cloudEvents_", trace)
}

fn json_data(body: &[u8]) -> Result<Value, Rejection> {
    if has_escaped_nul(body) {
        return Err(Rejection::new(Reason::Invalid, NUL_REFUSED));
    }
    serde_json::from_slice(body).map_err(|e| {
        unparsed(
            &e,
            Reason::BadJson,
            format!("the CloudEvent's data is not JSON: {e}"),
        )
    })
}

fn structured_cloud_event(
    body: &[u8],
    trace: String,
) -> Result<(SendEvent, SendEventOptions), Rejection> {
    if has_escaped_nul(body) {
        return Err(Rejection::new(Reason::Invalid, NUL_REFUSED));
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        unparsed(
            &e,
            Reason::BadJson,
            format!("Failed to parse the CloudEvent as JSON: {e}"),
        )
    })?;
    let Value::Object(mut attrs) = value else {
        return Err(Rejection::new(
            Reason::BadShape,
            "a structured CloudEvent must be a JSON object",
        ));
    };
    if attrs.contains_key("data_base64") {
        return Err(Rejection::new(
            Reason::UnsupportedContentType,
            "data_base64 is not accepted: an event's data must be JSON",
        ));
    }
    let data = attrs.remove("data").unwrap_or(Value::Null);
    from_cloud_event(attrs, data, "", trace)
}

/// A CloudEvent as a send: `id` is the event's id, `type` its name, `source` its source,
/// `time` its timestamp, the data its payload; the extensions `deliverat`, `deliverafter`
/// and `accountid` are the options; every other attribute (`specversion`, `subject`, ...)
/// goes into the event's context, so a dispatcher can filter on it. `shown` prefixes
/// attribute names in messages (`cloudEvents_` for headers).
fn from_cloud_event(
    mut attrs: Map<String, Value>,
    data: Value,
    shown: &str,
    trace: String,
) -> Result<(SendEvent, SendEventOptions), Rejection> {
    let missing = |name: &str| {
        Rejection::new(
            Reason::BadShape,
            format!(
                "{shown}{name} is missing: a CloudEvent needs specversion, id, source and type"
            ),
        )
    };
    match attrs.get("specversion") {
        Some(Value::String(v)) if v == CLOUDEVENTS_VERSION => {}
        Some(v) => {
            return Err(Rejection::new(
                Reason::UnknownVersion,
                format!(
                    "{shown}specversion {v} is not a version this service reads; it reads {CLOUDEVENTS_VERSION}"
                ),
            ));
        }
        None => return Err(missing("specversion")),
    }
    let mut required = |name: &str| match attrs.remove(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(Rejection::new(
            Reason::BadShape,
            format!("{shown}{name} must be a string, not {other}"),
        )),
        None => Err(missing(name)),
    };
    let id = required("id")?;
    let name = required("type")?;
    let source = required("source")?;
    let timestamp = match attrs.remove("time") {
        None | Some(Value::Null) => None,
        Some(t) => Some(time_of(&t, &format!("{shown}time"))?),
    };
    let deliver_at = match attrs.remove(CE_DELIVER_AT) {
        None | Some(Value::Null) => None,
        Some(t) => Some(time_of(&t, &format!("{shown}{CE_DELIVER_AT}"))?),
    };
    let deliver_after = match attrs.remove(CE_DELIVER_AFTER) {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| {
                    Rejection::new(
                        Reason::BadShape,
                        format!(
                            "{shown}{CE_DELIVER_AFTER} must be a whole number of seconds, not {v}"
                        ),
                    )
                })?,
        ),
    };
    let account_id = match attrs.remove(CE_ACCOUNT_ID) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            return Err(Rejection::new(
                Reason::BadShape,
                format!("{shown}{CE_ACCOUNT_ID} must be a string, not {other}"),
            ));
        }
    };
    let has_nul = |s: &str| s.contains('\0');
    if [&id, &name, &source].iter().any(|s| has_nul(s))
        || account_id.as_deref().is_some_and(has_nul)
        || attrs.values().any(|v| v.as_str().is_some_and(has_nul))
    {
        return Err(Rejection::new(Reason::Invalid, NUL_REFUSED));
    }
    let event = SendEvent {
        id: Some(id),
        name,
        payload: data,
        context: Some(Value::Object(attrs)),
        timestamp,
        source: Some(source),
        payload_type: None,
    };
    let options = SendEventOptions {
        deliver_at,
        deliver_after,
        account_id,
        trace_parent: Some(trace),
    };
    Ok((event, options))
}

/// An RFC 3339 time (or, from a header, an AMQP timestamp already turned into one).
fn time_of(value: &Value, name: &str) -> Result<DateTime<Utc>, Rejection> {
    value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| {
            Rejection::new(
                Reason::BadShape,
                format!("{name} must be an RFC 3339 time, not {value}"),
            )
        })
}

/// The media type without its parameters, lower-cased.
fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// `application/json` or any `application/…+json` but the CloudEvents ones.
fn is_json(essence: &str) -> bool {
    essence == "application/json"
        || (essence.starts_with("application/")
            && essence.ends_with("+json")
            && !essence.starts_with("application/cloudevents"))
}

/// A header by name, matched without regard to case.
fn header<'a>(headers: &'a FieldTable, name: &str) -> Option<&'a AMQPValue> {
    headers
        .inner()
        .iter()
        .find(|(k, _)| k.as_str().eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// A header value as JSON: text as a string, numbers as numbers, an AMQP timestamp as an
/// RFC 3339 time.
fn json_of(value: &AMQPValue) -> Value {
    if let Some(t) = text(value) {
        return Value::String(t);
    }
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::Timestamp(secs) => Utc
            .timestamp_opt(*secs as i64, 0)
            .single()
            .map(|t| Value::String(t.to_rfc3339()))
            .unwrap_or(Value::Null),
        AMQPValue::Double(d) => serde_json::Number::from_f64(*d).map_or(Value::Null, Value::Number),
        AMQPValue::Float(f) => {
            serde_json::Number::from_f64(*f as f64).map_or(Value::Null, Value::Number)
        }
        other => int(other).map_or(Value::Null, |i| Value::Number(i.into())),
    }
}

/// A header value as a producer would recognise it in a message.
fn shown(value: &AMQPValue) -> String {
    json_of(value).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn props(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut t = FieldTable::default();
        for (k, v) in headers {
            t.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(t)
    }

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(v.into())
    }

    fn rejected(r: Request) -> Reason {
        r.send.expect_err("a rejection").reason
    }

    #[test]
    fn a_native_message_reads_like_the_http_body() {
        let p = props(&[
            (API_KEY_HEADER, s("tr_dev_k")),
            (VERSION_HEADER, AMQPValue::LongInt(1)),
        ])
        .with_content_type("application/json".into())
        .with_message_id("evt-1".into());
        let body = json!({"event": {"name": "user.created", "payload": {"a": 1}},
                          "options": {"deliverAfter": 5, "accountId": "acc"}});
        let r = decode(&p, body.to_string().as_bytes());
        assert_eq!(r.api_key.unwrap().expose(), "tr_dev_k");
        let (event, options) = r.send.unwrap();
        assert_eq!(event.id.as_deref(), Some("evt-1"));
        assert_eq!(event.name, "user.created");
        assert_eq!(event.payload, json!({"a": 1}));
        assert_eq!(options.deliver_after, Some(5));
        assert_eq!(options.account_id.as_deref(), Some("acc"));
        assert!(options.trace_parent.is_some());
    }

    #[test]
    fn a_native_message_without_an_id_gets_one_from_its_body() {
        let body = br#"{"event": {"name": "tick"}}"#;
        let first = decode(&props(&[]), body).send.unwrap().0.id;
        let again = decode(&props(&[]), body).send.unwrap().0.id;
        assert_eq!(first, again);
        let other = decode(&props(&[]), br#"{"event": {"name": "tock"}}"#)
            .send
            .unwrap()
            .0
            .id;
        assert_ne!(first, other);
    }

    #[test]
    fn faults_get_their_reasons() {
        let json = BasicProperties::default().with_content_type("application/json".into());
        assert_eq!(
            rejected(decode(&json, b"\x00\xffnot json")),
            Reason::BadJson
        );
        assert_eq!(
            rejected(decode(&json, br#"{"name": "x"}"#)),
            Reason::BadShape
        );
        assert_eq!(
            rejected(decode(&json, br#"{"event": {"name": "a\u0000"}}"#)),
            Reason::Invalid
        );
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(rejected(decode(&json, &big)), Reason::TooLarge);
        let v2 = props(&[(VERSION_HEADER, s("2"))]);
        assert_eq!(
            rejected(decode(&v2, br#"{"event": {"name": "x"}}"#)),
            Reason::UnknownVersion
        );
        let xml = BasicProperties::default().with_content_type("text/xml".into());
        assert_eq!(
            rejected(decode(&xml, b"<a/>")),
            Reason::UnsupportedContentType
        );
        let differ = json.clone().with_message_id("m".into());
        assert_eq!(
            rejected(decode(&differ, br#"{"event": {"name": "x", "id": "e"}}"#)),
            Reason::BadShape
        );
        assert!(decode(&json, b"{}").api_key.is_none());
    }

    #[test]
    fn a_body_cut_short_is_bad_json_whatever_shape_it_began() {
        let json = BasicProperties::default().with_content_type("application/json".into());
        for body in [
            &b"[1, 2"[..],
            br#"{"event": "x""#,
            br#"{"event": {"name": "x"}"#,
            br#"{"event": 1"#,
        ] {
            let r = decode(&json, body).send.unwrap_err();
            assert_eq!(
                r.reason,
                Reason::BadJson,
                "{}: {}",
                String::from_utf8_lossy(body),
                r.message
            );
        }
        // Whole JSON of the wrong shape is still bad_shape.
        for body in [&b"[1, 2]"[..], br#"{"event": "x"}"#, br#"{"event": 1}"#] {
            assert_eq!(rejected(decode(&json, body)), Reason::BadShape);
        }
    }

    #[test]
    fn a_nul_in_text_data_is_refused_when_read() {
        let p = props(&[
            ("ce-specversion", s("1.0")),
            ("ce-id", s("t-1")),
            ("ce-type", s("t")),
            ("ce-source", s("/s")),
        ])
        .with_content_type("text/plain".into());
        let r = decode(&p, b"a\0b").send.unwrap_err();
        assert_eq!(r.reason, Reason::Invalid);
        assert_eq!(r.message, NUL_REFUSED);
        let (event, _) = decode(&p, b"ab").send.unwrap();
        assert_eq!(event.payload, json!("ab"));
    }

    #[test]
    fn binary_cloud_events_read_with_either_prefix() {
        for prefix in ["cloudEvents_", "cloudEvents:"] {
            let h = |a: &str| format!("{prefix}{a}");
            let p = props(&[
                (&h("specversion"), s("1.0")),
                (&h("id"), s("ce-1")),
                (&h("type"), s("order.paid")),
                (&h("source"), s("/shop")),
                (&h("time"), s("2026-01-02T03:04:05Z")),
                (&h("subject"), s("order-9")),
                (&h("deliverafter"), AMQPValue::LongInt(30)),
            ])
            .with_content_type("application/json".into());
            let (event, options) = decode(&p, br#"{"total": 3}"#).send.unwrap();
            assert_eq!(event.id.as_deref(), Some("ce-1"));
            assert_eq!(event.name, "order.paid");
            assert_eq!(event.source.as_deref(), Some("/shop"));
            assert_eq!(event.payload, json!({"total": 3}));
            assert_eq!(
                event.timestamp.unwrap().to_rfc3339(),
                "2026-01-02T03:04:05+00:00"
            );
            assert_eq!(
                event.context,
                Some(json!({"specversion": "1.0", "subject": "order-9",
                            "datacontenttype": "application/json"}))
            );
            assert_eq!(options.deliver_after, Some(30));
        }
    }

    #[test]
    fn what_the_cloudevents_sdks_write_reads_unchanged() {
        // The RabbitMQ binding: `ce-` headers, the data's type as content_type.
        let p = props(&[
            ("ce-specversion", s("1.0")),
            ("ce-id", s("r-1")),
            ("ce-type", s("t")),
            ("ce-source", s("/s")),
            ("ce-time", s("2026-01-02T03:04:05Z")),
        ])
        .with_content_type("application/json; charset=utf-8".into());
        let (event, _) = decode(&p, b"{}").send.unwrap();
        assert_eq!(event.id.as_deref(), Some("r-1"));
        assert_eq!(
            event.context.unwrap()["datacontenttype"],
            "application/json; charset=utf-8"
        );
        // The AMQP binding: times in milliseconds, the data's type in a header.
        let p = props(&[
            ("cloudEvents_specversion", s("1.0")),
            ("cloudEvents_id", s("a-1")),
            ("cloudEvents_type", s("t")),
            ("cloudEvents_source", s("/s")),
            (
                "cloudEvents_time",
                AMQPValue::LongLongInt(1_767_323_045_000),
            ),
            ("content-type", s("application/json")),
        ]);
        let (event, _) = decode(&p, br#"{"x": 1}"#).send.unwrap();
        assert_eq!(event.payload, json!({"x": 1}));
        assert_eq!(
            event.timestamp.unwrap().to_rfc3339(),
            "2026-01-02T03:04:05+00:00"
        );
    }

    #[test]
    fn structured_cloud_events_read_and_faults_are_named() {
        let p = BasicProperties::default()
            .with_content_type("application/cloudevents+json; charset=utf-8".into());
        let body = json!({"specversion": "1.0", "id": "x", "type": "t", "source": "s",
                          "data": [1, 2], "accountid": "acc"});
        let (event, options) = decode(&p, body.to_string().as_bytes()).send.unwrap();
        assert_eq!(event.payload, json!([1, 2]));
        assert_eq!(options.account_id.as_deref(), Some("acc"));
        let no_type = json!({"specversion": "1.0", "id": "x", "source": "s"});
        let r = decode(&p, no_type.to_string().as_bytes()).send.unwrap_err();
        assert_eq!(r.reason, Reason::BadShape);
        assert!(r.message.contains("type is missing"), "{}", r.message);
        let v03 = json!({"specversion": "0.3", "id": "x", "type": "t", "source": "s"});
        assert_eq!(
            rejected(decode(&p, v03.to_string().as_bytes())),
            Reason::UnknownVersion
        );
        let b64 = json!({"specversion": "1.0", "id": "x", "type": "t", "source": "s",
                         "data_base64": "AA=="});
        assert_eq!(
            rejected(decode(&p, b64.to_string().as_bytes())),
            Reason::UnsupportedContentType
        );
    }

    #[test]
    fn copies_lose_the_key_and_nothing_else() {
        let p = props(&[(API_KEY_HEADER, s("secret")), ("x-other", s("kept"))])
            .with_correlation_id("c".into());
        let copy = without_key(&p);
        let headers = copy.headers().as_ref().unwrap();
        assert!(!headers.contains_key(API_KEY_HEADER));
        assert!(headers.contains_key("x-other"));
        assert_eq!(copy.correlation_id().as_ref().unwrap().as_str(), "c");
        assert_eq!(format!("{:?}", ApiKey("secret".into())), "ApiKey(***)");
    }
}
