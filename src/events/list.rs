//! An environment's events, newest first, a page at a time: what `GET /api/v1/events` and
//! `events list` show. Pages are cut by (timestamp, id), walked on the index
//! `event_records_environment_timestamp_idx`; the cursor handed out is opaque to callers.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;

use super::EventRecord;
use super::wire::ApiEventLog;

/// Events in a page when the caller names no limit.
pub const DEFAULT_LIMIT: i64 = 50;
/// Most events one page holds.
pub const MAX_LIMIT: i64 = 500;

/// Where an event stands: `delayed` (due later), `pending` (due, not yet delivered),
/// `delivered` (its dispatchers were matched and its runs created) or `cancelled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventState {
    Delayed,
    Pending,
    Delivered,
    Cancelled,
}

impl EventState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delayed => "delayed",
            Self::Pending => "pending",
            Self::Delivered => "delivered",
            Self::Cancelled => "cancelled",
        }
    }

    /// The state of `r` at `now`, as the listing's filter decides it.
    pub fn of(r: &EventRecord, now: DateTime<Utc>) -> Self {
        if r.cancelled_at.is_some() {
            Self::Cancelled
        } else if r.delivered_at.is_some() {
            Self::Delivered
        } else if r.deliver_at > now {
            Self::Delayed
        } else {
            Self::Pending
        }
    }
}

impl std::str::FromStr for EventState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            Self::Delayed,
            Self::Pending,
            Self::Delivered,
            Self::Cancelled,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
        .ok_or_else(|| format!("{s:?}: a state is delayed, pending, delivered or cancelled"))
    }
}

/// Which events a page holds.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub name: Option<String>,
    /// Events whose timestamp is at or after this.
    pub since: Option<DateTime<Utc>>,
    /// Events whose timestamp is before this.
    pub until: Option<DateTime<Utc>>,
    pub state: Option<EventState>,
    /// At most this many (clamped to 1..=[`MAX_LIMIT`]).
    pub limit: i64,
    /// The `next` of the previous page.
    pub cursor: Option<Cursor>,
}

/// Where a page ends: the (timestamp, id) of its last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub timestamp: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    /// The text handed to callers (URL-safe).
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}.{}", self.timestamp.timestamp_micros(), self.id))
    }

    /// A cursor from its text, `None` for text no page handed out.
    pub fn decode(text: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
        let text = std::str::from_utf8(&bytes).ok()?;
        let (micros, id) = text.split_once('.')?;
        Some(Self {
            timestamp: DateTime::from_timestamp_micros(micros.parse().ok()?)?,
            id: Uuid::parse_str(id).ok()?,
        })
    }
}

/// An event as the listing shows it: trigger.dev's ApiEventLog, its source and its state.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ListedEvent {
    #[serde(flatten)]
    pub log: ApiEventLog,
    pub source: String,
    pub state: EventState,
}

impl ListedEvent {
    pub fn new(r: EventRecord, now: DateTime<Utc>) -> Self {
        Self {
            state: EventState::of(&r, now),
            log: ApiEventLog::from(&r),
            source: r.source,
        }
    }
}

/// A page of events, and where the next one starts (`None` on the last).
#[derive(Debug, Clone)]
pub struct Page {
    pub events: Vec<EventRecord>,
    pub next: Option<Cursor>,
    /// The time the states were decided at.
    pub now: DateTime<Utc>,
}

/// Most events one page looks at when it filters by name or state, which no index serves:
/// a page then holds the matches among the next this many events (by timestamp), and
/// `next` goes on from there, so each page costs the same however rare the matches.
pub const MAX_SCANNED: i64 = 10_000;

/// A page of the events of `environment_id`, newest first (by timestamp, then id). With a
/// name or state filter a page looks at [`MAX_SCANNED`] events at most: it may hold fewer
/// than `limit` (even none) and still have a `next`.
pub async fn list_events(
    pool: &PgPool,
    environment_id: Uuid,
    filter: &EventFilter,
) -> Result<Page, sqlx::Error> {
    let limit = filter.limit.clamp(1, MAX_LIMIT);
    let now = Utc::now();
    let cursor = (
        filter.cursor.map(|c| c.timestamp),
        filter.cursor.map(|c| c.id),
    );
    // The oldest event a filtered page looks at, when there are more than it may look at
    // (walked on the index alone).
    let floor = if filter.name.is_some() || filter.state.is_some() {
        sqlx::query!(
            r#"SELECT timestamp, id FROM event_records
               WHERE environment_id = $1
                 AND ($2::timestamptz IS NULL OR timestamp >= $2)
                 AND ($3::timestamptz IS NULL OR timestamp < $3)
                 AND ($4::timestamptz IS NULL OR (timestamp, id) < ($4, $5::uuid))
               ORDER BY timestamp DESC, id DESC
               OFFSET $6 LIMIT 1"#,
            environment_id,
            filter.since,
            filter.until,
            cursor.0,
            cursor.1,
            MAX_SCANNED - 1
        )
        .fetch_optional(pool)
        .await?
        .map(|r| Cursor {
            timestamp: r.timestamp,
            id: r.id,
        })
    } else {
        None
    };
    // One more than asked: whether it comes says whether there is a next page.
    let mut events = sqlx::query_as!(
        EventRecord,
        r#"SELECT id, environment_id, event_id, name, source, payload, context, timestamp,
                  deliver_at, delivered_at, cancelled_at, external_account_id, is_test,
                  created_at, updated_at
           FROM event_records
           WHERE environment_id = $1
             AND ($2::text IS NULL OR name = $2)
             AND ($3::timestamptz IS NULL OR timestamp >= $3)
             AND ($4::timestamptz IS NULL OR timestamp < $4)
             AND ($5::text IS NULL OR $5 = CASE
                   WHEN cancelled_at IS NOT NULL THEN 'cancelled'
                   WHEN delivered_at IS NOT NULL THEN 'delivered'
                   WHEN deliver_at > $6 THEN 'delayed'
                   ELSE 'pending' END)
             AND ($7::timestamptz IS NULL OR (timestamp, id) < ($7, $8::uuid))
             AND ($10::timestamptz IS NULL OR (timestamp, id) >= ($10, $11::uuid))
           ORDER BY timestamp DESC, id DESC
           LIMIT $9"#,
        environment_id,
        filter.name.as_deref(),
        filter.since,
        filter.until,
        filter.state.map(EventState::as_str),
        now,
        cursor.0,
        cursor.1,
        limit + 1,
        floor.map(|c| c.timestamp),
        floor.map(|c| c.id)
    )
    .fetch_all(pool)
    .await?;
    let next = if events.len() as i64 > limit {
        events.truncate(limit as usize);
        events.last().map(|e| Cursor {
            timestamp: e.timestamp,
            id: e.id,
        })
    } else {
        // Fewer matches than asked among the events looked at: the next page starts
        // below the oldest of those, if there are older ones.
        floor
    };
    Ok(Page { events, next, now })
}

/// How many events `environment_id` received in each of the last `minutes` minutes (by
/// their timestamp), oldest first, a zero for a minute without any.
pub async fn per_minute(
    pool: &PgPool,
    environment_id: Uuid,
    minutes: i32,
) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT count(e.id) AS "n!"
           FROM generate_series(0, $2 - 1) AS m(i)
           LEFT JOIN event_records e
             ON e.environment_id = $1
            AND e.timestamp >= date_trunc('minute', now()) - make_interval(mins => $2 - 1 - m.i)
            AND e.timestamp < date_trunc('minute', now()) - make_interval(mins => $2 - 2 - m.i)
           GROUP BY m.i ORDER BY m.i"#,
        environment_id,
        minutes
    )
    .fetch_all(pool)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_reads_back_and_other_text_does_not() {
        let c = Cursor {
            timestamp: DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("nope"), None);
        assert_eq!(Cursor::decode(""), None);
        assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode("1.x")), None);
    }

    #[test]
    fn states_read_back() {
        for s in ["delayed", "pending", "delivered", "cancelled"] {
            assert_eq!(s.parse::<EventState>().unwrap().as_str(), s);
        }
        assert!("queued".parse::<EventState>().is_err());
    }
}
