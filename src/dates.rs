//! Dates as the API and the dead letters write them.

use chrono::{DateTime, SecondsFormat, Utc};

/// Dates as trigger.dev writes them: ISO 8601, milliseconds, `Z`.
pub fn iso(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}
