//! The one way a job message enters RabbitMQ.
//!
//! [`publish_job`] looks at the job's due time: due now, the message goes to the work
//! exchange of its kind; due later, it enters the delay tiers at the level of its longest
//! part, and RabbitMQ hands it to the work queue when the time has passed. The relay uses
//! it for everything it publishes, the worker for messages that arrived early (and later
//! for retries, which are delayed jobs like any other).

use chrono::{DateTime, Utc};
use lapin::PublisherConfirm;
use lapin::options::BasicPublishOptions;
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};

use super::tiers::{self, DelayDigits};
use super::{JobMessage, Topology};
use crate::ledger::{Job, JobKind};

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub exchange: String,
    pub routing_key: String,
    /// The delay the tiers hold, `None` for a message due now.
    pub delay: Option<DelayDigits>,
}

/// Where a job message is headed: its kind, River queue, shard and AMQP priority.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub kind: JobKind,
    pub queue: &'a str,
    pub shard: u16,
    /// `None`: the default level (see [`crate::amqp::topology::DEFAULT_PRIORITY`]).
    pub priority: Option<u8>,
}

/// The route of a message for `to`, due at `run_at`, seen at `now`: it is meant to reach
/// its work queue the topology's delay lead before `run_at` (a worker holds it for the
/// rest), so one due within the lead goes straight there. The tiers keep the work key
/// (shard, and priority level with quorum queues) in the routing key, so a delayed message
/// comes back to its shard and level.
pub fn route(
    topology: &Topology,
    to: Destination<'_>,
    run_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Route {
    let Destination {
        kind,
        queue,
        shard,
        priority,
    } = to;
    let key = topology.work_key(queue, shard, priority);
    let remaining = (run_at - now)
        .to_std()
        .ok()
        .and_then(|r| r.checked_sub(topology.delay_lead()))
        .map(tiers::remaining_ms)
        .unwrap_or(0);
    let digits = DelayDigits::of(remaining);
    match digits.entry_level() {
        None => Route {
            exchange: topology.exchange(kind),
            routing_key: key,
            delay: None,
        },
        Some(level) => Route {
            exchange: topology.delay_exchange(level),
            routing_key: digits.routing_key(kind.as_str(), &key),
            delay: Some(digits),
        },
    }
}

/// The header a job message carries with the moment it was published, in microseconds since
/// the Unix epoch: the worker times the broker's hop with it.
pub const PUBLISHED_AT_HEADER: &str = "x-kongflow-published-us";

/// When a job message was published, from its [`PUBLISHED_AT_HEADER`].
pub fn published_at(properties: &BasicProperties) -> Option<DateTime<Utc>> {
    let micros = match properties
        .headers()
        .as_ref()?
        .inner()
        .get(PUBLISHED_AT_HEADER)?
    {
        AMQPValue::LongLongInt(v) => *v,
        _ => return None,
    };
    DateTime::from_timestamp_micros(micros)
}

/// Publish a job's message to `shard` by its due time as seen at `now` (`mandatory`, so a
/// message no queue takes comes back instead of vanishing), stamped with `now` in
/// [`PUBLISHED_AT_HEADER`]. The caller awaits the returned confirm.
pub async fn publish_job(
    channel: &Channel,
    topology: &Topology,
    kind: JobKind,
    shard: u16,
    message: &JobMessage,
    properties: BasicProperties,
    now: DateTime<Utc>,
) -> lapin::Result<PublisherConfirm> {
    let to = Destination {
        kind,
        queue: &message.queue,
        shard,
        priority: *properties.priority(),
    };
    let route = route(topology, to, message.run_at, now);
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        PUBLISHED_AT_HEADER.into(),
        AMQPValue::LongLongInt(now.timestamp_micros()),
    );
    if let Some(install) = topology.install() {
        headers.insert(
            super::owner::INSTALL_HEADER.into(),
            AMQPValue::LongString(install.to_string().into()),
        );
    }
    let properties = properties.with_headers(headers);
    channel
        .basic_publish(
            route.exchange.as_str().into(),
            route.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &message.to_bytes(),
            properties,
        )
        .await
}

/// Count a job whose message the broker confirmed.
pub fn count_published(job: &Job) {
    crate::metrics::metrics()
        .jobs_published
        .with_label_values(&[job.kind.as_str(), &job.queue])
        .inc();
}

/// The log line of a job whose message the broker confirmed, with its trace. A macro, so
/// the line's target names the module that published (the relay, or `amqp::direct`).
macro_rules! log_published {
    ($job:expr) => {
        tracing::debug!(
            job_id = $job.id,
            kind = $job.kind.as_str(),
            attempt = $job.attempt,
            trace_id = $job.trace_id().unwrap_or_default(),
            "job published"
        )
    };
}
pub(crate) use log_published;

/// What a dead letter says about its job, in its headers.
#[derive(Debug, Clone)]
pub struct DeadJob<'a> {
    pub id: i64,
    pub kind: &'a str,
    pub attempts: i32,
}

/// Header names of dead letters.
pub const REASON_HEADER: &str = "x-kongflow-reason";
pub const JOB_ID_HEADER: &str = "x-kongflow-job-id";
pub const KIND_HEADER: &str = "x-kongflow-kind";
pub const ATTEMPTS_HEADER: &str = "x-kongflow-attempts";
pub const DEAD_AT_HEADER: &str = "x-kongflow-dead-at";

/// Copy a message to the dead-letter queue with the reason (and, for a discarded job, its
/// id, kind and attempts) in its headers. The caller awaits the returned confirm.
pub async fn publish_dead(
    channel: &Channel,
    topology: &Topology,
    body: &[u8],
    reason: &str,
    job: Option<DeadJob<'_>>,
    properties: BasicProperties,
) -> lapin::Result<PublisherConfirm> {
    let mut headers = properties.headers().clone().unwrap_or_default();
    // Headers are short strings: RabbitMQ tools show them in full.
    let reason: String = reason.chars().take(1000).collect();
    headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
    headers.insert(
        DEAD_AT_HEADER.into(),
        AMQPValue::LongString(crate::dates::iso(Utc::now()).into()),
    );
    if let Some(job) = job {
        headers.insert(JOB_ID_HEADER.into(), AMQPValue::LongLongInt(job.id));
        headers.insert(
            KIND_HEADER.into(),
            AMQPValue::LongString(job.kind.to_string().into()),
        );
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(job.attempts));
    }
    channel
        .basic_publish(
            topology.dead_exchange().as_str().into(),
            "".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties.with_headers(headers).with_delivery_mode(2),
        )
        .await
}

/// The AMQP properties of a job's message.
pub fn properties(job: &Job) -> BasicProperties {
    json_properties(
        &job.id.to_string(),
        job.kind.as_str(),
        job.trace_parent.as_deref(),
    )
    .with_priority(job.priority.amqp_priority())
}

/// Properties every message this service publishes carries: persistent JSON, its id and
/// type, the time, and the W3C `traceparent` header when there is one.
fn json_properties(message_id: &str, kind: &str, trace_parent: Option<&str>) -> BasicProperties {
    let mut headers = lapin::types::FieldTable::default();
    if let Some(tp) = trace_parent {
        headers.insert("traceparent".into(), AMQPValue::LongString(tp.into()));
    }
    BasicProperties::default()
        .with_headers(headers)
        .with_content_type("application/json".into())
        // 2: persistent, written to disk by the broker.
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
        .with_type(kind.into())
        .with_timestamp(Utc::now().timestamp().max(0) as u64)
}

/// Publish a run hand-off (see [`crate::runs`]) to the runs exchange, `mandatory`, for a
/// publisher confirm. `body` is its message.
pub async fn publish_handoff(
    channel: &Channel,
    topology: &Topology,
    handoff: &crate::runs::handoff::HandOff,
    body: &serde_json::Value,
) -> lapin::Result<PublisherConfirm> {
    let properties = json_properties(
        &handoff.message_id(),
        &handoff.amqp_type(),
        handoff.trace_parent.as_deref(),
    );
    channel
        .basic_publish(
            topology.runs_exchange().as_str().into(),
            handoff.routing_key().as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &serde_json::to_vec(body).expect("a JSON value serializes"),
            properties,
        )
        .await
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn to(kind: JobKind, shard: u16) -> Destination<'static> {
        Destination {
            kind,
            queue: "events",
            shard,
            priority: None,
        }
    }

    /// Where a job of `kind` due `ahead` from now is routed.
    fn ahead(t: &Topology, kind: JobKind, ahead: Duration) -> Route {
        let now = Utc::now();
        route(t, to(kind, 0), now + ahead, now)
    }

    #[test]
    fn due_now_or_past_goes_to_the_work_exchange() {
        let t = Topology::new("kf");
        let now = Utc::now();
        for run_at in [now, now - Duration::days(3)] {
            let r = route(&t, to(JobKind::DeliverEvent, 0), run_at, now);
            assert_eq!(r.exchange, "kf.deliverEvent");
            assert_eq!(r.routing_key, "events");
            assert_eq!(r.delay, None);
        }
        // Less than a millisecond ahead still waits: a job never runs before it is due.
        let r = ahead(&t, JobKind::DeliverEvent, Duration::microseconds(900));
        assert_eq!(r.exchange, "kf.delay.00");
        assert_eq!(r.delay.unwrap().total_ms(), 1);
    }

    #[test]
    fn due_later_enters_the_tiers_at_its_longest_part() {
        let t = Topology::new("kf");
        let r = ahead(&t, JobKind::InvokeDispatcher, Duration::milliseconds(5_000));
        // 5000 ms = 1*4^6 + 0*4^5 + 3*4^4 + 2*4^3 + 0*4^2 + 2*4^1 + 0*4^0
        assert_eq!(r.exchange, "kf.delay.06");
        assert!(
            r.routing_key
                .ends_with(".1.0.3.2.0.2.0.events.invokeDispatcher.events"),
            "{}",
            r.routing_key
        );
        assert_eq!(r.delay.unwrap().total_ms(), 5_000);
    }

    #[test]
    fn a_shard_keeps_its_key_through_the_tiers() {
        let t = Topology::new("kf").with_shards(4);
        let now = Utc::now();
        let r = route(&t, to(JobKind::DeliverEvent, 3), now, now);
        assert_eq!(
            (r.exchange.as_str(), r.routing_key.as_str()),
            ("kf.deliverEvent", "events.s3")
        );
        let r = route(
            &t,
            to(JobKind::DeliverEvent, 2),
            now + Duration::seconds(5),
            now,
        );
        assert!(
            r.routing_key.ends_with(".deliverEvent.events.s2"),
            "{}",
            r.routing_key
        );
        assert!(!r.routing_key.ends_with(".deliverEvent.events"));
    }

    #[test]
    fn the_lead_comes_off_the_delay() {
        let t = Topology::new("kf").with_delay_lead(std::time::Duration::from_millis(100));
        let r = ahead(&t, JobKind::DeliverEvent, Duration::milliseconds(5_000));
        assert_eq!(r.delay.unwrap().total_ms(), 4_900);
        // Due within the lead: straight to the work queue, where a worker holds it.
        let r = ahead(&t, JobKind::DeliverEvent, Duration::milliseconds(60));
        assert_eq!(r.delay, None);
        assert_eq!(r.exchange, "kf.deliverEvent");
    }

    #[test]
    fn a_year_enters_at_the_top() {
        let t = Topology::new("kf");
        let r = ahead(&t, JobKind::DeliverEvent, Duration::days(365));
        assert_eq!(r.exchange, t.delay_exchange(tiers::LEVELS - 1));
        assert_eq!(r.delay.unwrap().total_ms(), 365 * 86_400_000);
    }
}
