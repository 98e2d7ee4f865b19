//! The body of a job message (JSON, version 1).
//!
//! The ledger row is the truth; the message names the row and carries a copy of what a
//! reader of the queue wants to see without a database (kind, args, attempt, due time).

use chrono::{DateTime, Utc};
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

    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
