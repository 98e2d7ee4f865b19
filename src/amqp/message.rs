//! The body of a job message (JSON, version 1).
//!
//! The ledger row is the truth; the message names the row and carries a copy of what a
//! reader of the queue wants to see without a database (kind, args, attempt, due time).
//! With it, the one reading of header values ([`header_text`], [`header_int`]) for the
//! headers of any message this service consumes or inspects.

use chrono::{DateTime, Utc};
use lapin::types::AMQPValue;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ledger::Job;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobMessage {
    /// Format version; this is 1.
    pub v: u8,
    /// The job's id in the ledger.
    pub id: i64,
    pub kind: String,
    pub queue: String,
    pub args: Value,
    pub attempt: i32,
    pub run_at: DateTime<Utc>,
}

impl JobMessage {
    pub const VERSION: u8 = 1;

    pub fn from_job(job: &Job) -> Self {
        Self {
            v: Self::VERSION,
            id: job.id,
            kind: job.kind.as_str().to_string(),
            queue: job.queue.clone(),
            args: job.args.to_value(),
            attempt: job.attempt,
            run_at: job.run_at,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a job message serializes")
    }

    /// [`JobMessage::parse`] for a worker: what cannot be read is [`Unrunnable`].
    pub fn read(bytes: &[u8]) -> Result<Self, Unrunnable> {
        Self::parse(bytes).map_err(|e| Unrunnable::Unparseable(e.to_string()))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A header's text (a long or short string of UTF-8).
pub fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_string),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// A header as a whole number, whichever integer type (or text) the client chose.
pub fn header_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(i) => Some(*i as i64),
        AMQPValue::ShortShortUInt(i) => Some(*i as i64),
        AMQPValue::ShortInt(i) => Some(*i as i64),
        AMQPValue::ShortUInt(i) => Some(*i as i64),
        AMQPValue::LongInt(i) => Some(*i as i64),
        AMQPValue::LongUInt(i) => Some(*i as i64),
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::Double(d) if d.fract() == 0.0 => Some(*d as i64),
        AMQPValue::Float(f) if f.fract() == 0.0 => Some(*f as i64),
        other => header_text(other).and_then(|t| t.trim().parse().ok()),
    }
}

/// Why a message on a work queue cannot be run: it is dead-lettered, this its reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrunnable {
    #[error("unparseable job message: {0}")]
    Unparseable(String),
    #[error("a message of kind {found:?} on the queue of {queue:?}")]
    WrongQueue { found: String, queue: &'static str },
}
