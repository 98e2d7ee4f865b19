//! AMQP ingest: send-event requests that producers publish to the ingest exchange.
//!
//! Each consumer takes the requests waiting for it (up to `ingest_batch_size`, from what
//! the prefetch already holds) and handles them as one batch:
//!
//! 1. read each message ([`decode`]) and look up the environments of their API keys with
//!    one query;
//! 2. store every valid request with one transaction, through the same path as HTTP ingest
//!    ([`EventsService::ingest_each`]): same validation, same idempotence on the event id;
//! 3. copy each request that cannot be stored to the rejected exchange, its reason in
//!    headers and its API key removed, and wait for the broker's confirms;
//!    a valid request over its environment's `max_events_per_second` is not stored: a copy
//!    goes round the delay tiers, back to the ingest queue when the rate allows it (see
//!    [`Ingest::over_rate`]), so it waits without holding up other environments' messages;
//! 4. answer each request that asked (`reply_to`) as the HTTP API would;
//! 5. publish the batch's `deliverEvent` jobs (the fast path), while the next batch is
//!    handled, and acknowledge the batch once that publish is settled (confirmed, or its
//!    jobs handed back to the outbox).
//!
//! A message is acknowledged only once it is committed (and its jobs' publish settled) or
//! its rejected copy is confirmed.
//! A failure that says nothing about the messages (the database or the broker is
//! unreachable) ends the consumer before it acknowledges: the broker delivers the batch
//! again to the consumer that reconnects, and the event ids make the second delivery store
//! nothing new.

pub mod decode;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::topology::INGEST_DEFERRED;
use crate::amqp::{self, Topology, tiers};
use crate::config::IngestConfig;
use crate::events::ratelimit::RateLimiter;
use crate::events::wire::event_log;
use crate::events::{EventsService, IngestError, IngestResult, SendEvent, SendEventOptions};
use crate::failpoint;
use crate::metrics::{ConnectedGuard, Stage, metrics};
use crate::tenants::{Environment, KeyCache};
use decode::{Reason, Rejection, Request};

/// The header of a reply that carries the HTTP status the API would have answered.
pub const STATUS_HEADER: &str = "x-kongflow-status";
/// Headers of a rejected copy: the reason (a [`Reason`] label) and the message. The reason
/// header is the one a dead-lettered job carries.
pub use crate::amqp::publish::REASON_HEADER;
pub const ERROR_HEADER: &str = "x-kongflow-error";
pub const REJECTED_AT_HEADER: &str = "x-kongflow-rejected-at";
/// Headers of the rejected copy of a message too large: only its first
/// [`TRUNCATED_BODY_BYTES`] are kept, `x-kongflow-truncated` says so (`true`) and
/// `x-kongflow-original-size` gives the size of the body as it came, in bytes.
pub const TRUNCATED_HEADER: &str = "x-kongflow-truncated";
pub const ORIGINAL_SIZE_HEADER: &str = "x-kongflow-original-size";
/// How much of a `too_large` message's body its rejected copy keeps: 64 KiB.
pub const TRUNCATED_BODY_BYTES: usize = 64 * 1024;
/// The header of a request sent round the delay tiers for its environment's rate: how many
/// times it was.
pub const DEFERRED_HEADER: &str = "x-kongflow-deferred";
/// Longest a request waits in the tiers in one round; past it, it comes back and waits again.
pub const MAX_DEFER: Duration = Duration::from_secs(600);

/// The delivery jobs a batch stored for this process to publish, with their ticket.
type Created = (
    Vec<crate::ledger::Job>,
    Option<crate::ledger::publishers::Ticket>,
);

#[derive(Debug, thiserror::Error)]
pub enum IngestRoleError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("ingest: {0}")]
    Ingest(#[from] IngestError),
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker closed the consumer")]
    ConsumerClosed,
    #[error("the broker did not take a rejected or deferred copy")]
    RejectedNotConfirmed,
    #[error("a consumer task failed: {0}")]
    Task(String),
}

/// What became of one message of a batch.
#[derive(Debug)]
pub enum Fate {
    Stored(Box<IngestResult>),
    Rejected(Rejection),
    /// Over its environment's rate: sent round the delay tiers for this long.
    Deferred(Duration),
}

/// The ingest consumer role.
#[derive(Clone)]
pub struct Ingest {
    pool: PgPool,
    events: EventsService,
    topology: Topology,
    config: IngestConfig,
    /// Publishes each batch's delivery jobs after its commit; without one, the relay does.
    direct: Option<amqp::DirectPublisher>,
    /// API keys looked up, remembered for a second.
    keys: KeyCache,
    /// Each environment's `max_events_per_second`, for this process's ingest consumers.
    limiter: RateLimiter,
}

/// A batch whose jobs are being published; its messages are acknowledged once that ends.
struct InFlight {
    publish: tokio::task::JoinHandle<()>,
    last: Delivery,
}

impl InFlight {
    /// Wait for the publish, then acknowledge the batch (every delivery up to its last).
    async fn settle(self) -> Result<(), IngestRoleError> {
        self.publish
            .await
            .map_err(|e| IngestRoleError::Task(e.to_string()))?;
        self.last.ack(BasicAckOptions { multiple: true }).await?;
        Ok(())
    }
}

impl Ingest {
    pub fn new(pool: PgPool, topology: Topology, config: IngestConfig) -> Self {
        Self {
            events: EventsService::new(pool.clone()),
            pool,
            topology,
            config,
            direct: None,
            keys: KeyCache::default(),
            limiter: RateLimiter::default(),
        }
    }

    /// Publish the delivery jobs of each committed batch with `publisher` (the fast path).
    pub fn publishing(self, publisher: amqp::DirectPublisher) -> Self {
        Self {
            direct: Some(publisher),
            ..self
        }
    }

    /// Run until `shutdown`, reconnecting with backoff.
    pub async fn run(self, amqp_url: String, shutdown: CancellationToken) {
        for reason in Reason::ALL {
            metrics()
                .ingest_rejected
                .with_label_values(&[reason.as_str()]);
        }
        crate::supervise::supervise_connected(
            "ingest",
            self,
            amqp_url,
            shutdown,
            |this, url, stop| async move { this.run_connected(&url, stop).await },
        )
        .await
    }

    async fn run_connected(
        &self,
        url: &str,
        shutdown: CancellationToken,
    ) -> Result<(), IngestRoleError> {
        let conn: Connection = amqp::connect_declared(url, "ingest", &self.topology).await?;
        let publisher = self.publisher(&conn).await?;
        // Replies go out unconfirmed, on a channel of their own: a lost reply loses no
        // event, and confirms nobody waits for would pile up on a confirm-mode channel.
        let replies = conn.create_channel().await?;
        let _connected = ConnectedGuard::new("ingest");
        let mut tasks = JoinSet::new();
        for _ in 0..self.config.ingest_concurrency.max(1) {
            let channel = conn.create_channel().await?;
            let this = self.clone();
            let shutdown = shutdown.clone();
            let channels = (publisher.clone(), replies.clone());
            tasks.spawn(async move { this.consume(channel, channels, shutdown).await });
        }
        tracing::info!("ingest connected");
        let result = crate::supervise::until_first_failure(tasks, IngestRoleError::Task).await;
        let _ = conn.close(200, "bye".into()).await;
        result
    }

    /// A channel in confirm mode, for rejected copies and replies.
    pub async fn publisher(&self, conn: &Connection) -> Result<Channel, IngestRoleError> {
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(publisher)
    }

    async fn consume(
        &self,
        channel: Channel,
        (publisher, replies): (Channel, Channel),
        shutdown: CancellationToken,
    ) -> Result<(), IngestRoleError> {
        channel
            .basic_qos(self.config.ingest_prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = channel
            .basic_consume(
                self.topology.ingest_queue().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // The previous batch, acknowledged once its jobs' publish is settled: the publish
        // of one batch overlaps the handling of the next.
        let mut in_flight: Option<InFlight> = None;
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // Nothing new arrives: settle the previous batch as soon as it can be.
                joined = async { (&mut in_flight.as_mut().expect("checked").publish).await },
                    if in_flight.is_some() => {
                    // A publish task that died leaves its batch unacknowledged: it comes
                    // back, and the resend re-arms its jobs.
                    joined.map_err(|e| IngestRoleError::Task(e.to_string()))?;
                    let done = in_flight.take().expect("checked");
                    done.last.ack(BasicAckOptions { multiple: true }).await?;
                    continue;
                }
                d = consumer.next() => d,
            };
            let Some(first) = first else {
                return Err(IngestRoleError::ConsumerClosed);
            };
            let mut batch = vec![first?];
            while batch.len() < self.config.ingest_batch_size.max(1) {
                match consumer.next().now_or_never() {
                    Some(Some(d)) => batch.push(d?),
                    _ => break,
                }
            }
            let (_, jobs) = self.handle_batch(&publisher, &replies, &batch).await?;
            // Deliveries are acknowledged in order, with `multiple`: the previous batch
            // first, then this one once its publish is settled.
            if let Some(previous) = in_flight.take() {
                previous.settle().await?;
            }
            let direct = self.direct.clone();
            let last = batch.pop().expect("a batch is never empty");
            in_flight = Some(InFlight {
                publish: tokio::spawn(async move {
                    if let (Some(d), (jobs, Some(ticket))) = (direct, jobs) {
                        d.publish(&jobs, ticket).await;
                    }
                }),
                last,
            });
        }
        if let Some(previous) = in_flight.take() {
            previous.settle().await?;
        }
        // Prefetched messages not yet handled go back to the queue when the channel closes.
        let _ = channel.close(200, "bye".into()).await;
        Ok(())
    }

    /// Handle a batch: store what can be stored, copy the rest to the rejected exchange,
    /// answer those that asked. Returns what became of each message, in order, and the
    /// delivery jobs to publish (inserted marked published when this role has a publisher,
    /// else left to the relay, and none returned). The caller publishes them, then
    /// acknowledges the messages.
    async fn handle_batch(
        &self,
        publisher: &Channel,
        replies: &Channel,
        batch: &[Delivery],
    ) -> Result<(Vec<Fate>, Created), IngestRoleError> {
        let started = Instant::now();
        let requests: Vec<Request> = batch
            .iter()
            .map(|d| decode::decode(&d.properties, &d.data))
            .collect();
        metrics().stage(Stage::Decode, started);
        let started = Instant::now();
        let envs = self.environments(&requests).await?;
        metrics().stage(Stage::Auth, started);
        let (outcomes, jobs) = self.store(requests, &envs).await?;
        failpoint::pause(failpoint::INGEST_AFTER_COMMIT).await;
        let started = Instant::now();
        let mut confirms = Vec::new();
        for (delivery, outcome) in batch.iter().zip(&outcomes) {
            match outcome {
                Fate::Rejected(rejection) => confirms.push(
                    self.publish_rejected(publisher, delivery, rejection)
                        .await?,
                ),
                Fate::Deferred(wait) => {
                    confirms.push(self.publish_deferred(publisher, delivery, *wait).await?)
                }
                Fate::Stored(_) => {}
            }
        }
        let allowed = self.reply_prefix();
        for (delivery, outcome) in batch.iter().zip(&outcomes) {
            reply(replies, delivery, outcome, &allowed).await?;
        }
        for confirm in confirms {
            // A copy the broker returned (no queue bound) is no more kept than a nacked one.
            if !matches!(confirm.await?, lapin::Confirmation::Ack(None)) {
                return Err(IngestRoleError::RejectedNotConfirmed);
            }
        }
        metrics().stage(Stage::Reply, started);
        record(&outcomes);
        Ok((outcomes, jobs))
    }

    /// The start of the names of queues replies may go to, besides direct reply-to.
    fn reply_prefix(&self) -> String {
        self.config
            .ingest_reply_prefix
            .clone()
            .unwrap_or_else(|| format!("{}.reply.", self.topology.prefix()))
    }

    /// The environments of the batch's API keys, with one query.
    async fn environments(
        &self,
        requests: &[Request],
    ) -> Result<HashMap<String, Environment>, IngestRoleError> {
        let mut keys: Vec<&str> = requests
            .iter()
            .filter_map(|r| r.api_key.as_ref().map(|k| k.expose()))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(self.keys.find_many(&self.pool, &keys).await?)
    }

    /// Store every request whose key is known and that reads, in one transaction; the
    /// others are rejected, checked in the order the HTTP API checks them (key, then body).
    async fn store(
        &self,
        requests: Vec<Request>,
        envs: &HashMap<String, Environment>,
    ) -> Result<(Vec<Fate>, Created), IngestRoleError> {
        let mut outcomes: Vec<Option<Fate>> = Vec::with_capacity(requests.len());
        let mut items: Vec<(Environment, SendEvent, SendEventOptions)> = Vec::new();
        let mut at = Vec::new();
        let mut deferred = HashMap::new();
        let now = Instant::now();
        for request in requests {
            let refused =
                |reason, message: &str| Some(Fate::Rejected(Rejection::new(reason, message)));
            let Some(key) = request.api_key else {
                outcomes.push(refused(
                    Reason::MissingKey,
                    &format!("missing {} header", decode::API_KEY_HEADER),
                ));
                continue;
            };
            let Some(env) = envs.get(key.expose()) else {
                outcomes.push(refused(Reason::Unauthorized, "invalid API key"));
                continue;
            };
            if request.send.is_ok()
                && let Some(wait) = self.over_rate(env, &mut deferred, now)
            {
                outcomes.push(Some(Fate::Deferred(wait)));
                continue;
            }
            match request.send {
                Ok((event, options)) => {
                    at.push(outcomes.len());
                    outcomes.push(None);
                    items.push((env.clone(), event, options));
                }
                Err(rejection) => outcomes.push(Some(Fate::Rejected(rejection))),
            }
        }
        let mut jobs = (Vec::new(), None);
        if !items.is_empty() {
            let results = if let Some(direct) = &self.direct {
                let ticket = direct.ticket().await?;
                let (results, created) = self
                    .events
                    .ingest_each_for_caller(items, ticket.stamp())
                    .await?;
                jobs = (created, Some(ticket));
                results
            } else {
                self.events.ingest_each(items).await?
            };
            for (i, result) in at.into_iter().zip(results) {
                outcomes[i] = Some(match result {
                    Ok(stored) => Fate::Stored(Box::new(stored)),
                    Err(IngestError::Invalid(m)) => {
                        Fate::Rejected(Rejection::new(Reason::Invalid, m))
                    }
                    Err(IngestError::TooLarge(m)) => {
                        Fate::Rejected(Rejection::new(Reason::TooLarge, m))
                    }
                    // Not the request's fault: the batch is tried again.
                    Err(e) => return Err(e.into()),
                });
            }
        }
        Ok((outcomes.into_iter().flatten().collect(), jobs))
    }

    /// How long a request of `env` must wait for its rate, if it must: the bucket's wait, plus
    /// a slot of `1 / rate` for each request of `env` this batch already deferred (`behind`),
    /// so they come back one by one at the rate instead of all at once, each within
    /// [`MAX_DEFER`]. `None`: it may be stored now (its event taken from the allowance).
    fn over_rate(
        &self,
        env: &Environment,
        behind: &mut HashMap<uuid::Uuid, u32>,
        now: Instant,
    ) -> Option<Duration> {
        let rate = u32::try_from(env.max_events_per_second?)
            .unwrap_or(1)
            .max(1);
        let wait = self.limiter.take(env.id, rate, 1, now).err()?;
        let ahead = behind.entry(env.id).or_default();
        let wait = wait + Duration::from_secs_f64(f64::from(*ahead) / f64::from(rate));
        *ahead += 1;
        Some(wait.min(MAX_DEFER))
    }

    /// Send a copy of a message (key included: it comes back to be stored) round the delay
    /// tiers, to reach the ingest queue again after `wait`. The caller awaits the confirm.
    async fn publish_deferred(
        &self,
        publisher: &Channel,
        delivery: &Delivery,
        wait: Duration,
    ) -> Result<lapin::PublisherConfirm, IngestRoleError> {
        let digits = tiers::DelayDigits::of(tiers::remaining_ms(wait).max(1));
        let level = digits.entry_level().expect("a delay of 1 ms or more");
        let (kind, queue) = INGEST_DEFERRED;
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let times = match headers.inner().get(DEFERRED_HEADER) {
            Some(AMQPValue::LongInt(n)) => n.saturating_add(1),
            _ => 1,
        };
        headers.insert(DEFERRED_HEADER.into(), AMQPValue::LongInt(times));
        Ok(publisher
            .basic_publish(
                self.topology.delay_exchange(level).as_str().into(),
                digits.routing_key(kind, queue).as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &delivery.data,
                delivery
                    .properties
                    .clone()
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await?)
    }

    /// Copy a message to the rejected exchange: its body and properties, its API key
    /// removed, its reason added. The caller awaits the confirm.
    async fn publish_rejected(
        &self,
        publisher: &Channel,
        delivery: &Delivery,
        rejection: &Rejection,
    ) -> Result<lapin::PublisherConfirm, IngestRoleError> {
        let properties = decode::without_key(&delivery.properties);
        let mut headers = properties.headers().clone().unwrap_or_default();
        let message: String = rejection.message.chars().take(1000).collect();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(rejection.reason.as_str().into()),
        );
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(message.into()));
        headers.insert(
            REJECTED_AT_HEADER.into(),
            AMQPValue::LongString(crate::dates::iso(chrono::Utc::now()).into()),
        );
        // A message too large is not copied whole: the rejected queue would hold what the
        // service refused to hold.
        let mut body = &delivery.data[..];
        if rejection.reason == Reason::TooLarge && body.len() > TRUNCATED_BODY_BYTES {
            headers.insert(TRUNCATED_HEADER.into(), AMQPValue::Boolean(true));
            headers.insert(
                ORIGINAL_SIZE_HEADER.into(),
                AMQPValue::LongLongInt(body.len() as i64),
            );
            body = &body[..TRUNCATED_BODY_BYTES];
        }
        tracing::warn!(
            reason = rejection.reason.as_str(),
            error = ?rejection.message,
            message_id = ?delivery.properties.message_id().as_ref().map(|m| m.as_str()),
            "ingest request rejected"
        );
        Ok(publisher
            .basic_publish(
                self.topology.rejected_exchange().as_str().into(),
                "".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties.with_headers(headers).with_delivery_mode(2),
            )
            .await?)
    }
}

/// Direct reply-to: the pseudo-queue of the channel that asked.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// Queues the broker named (`queue.declare` with an empty name): no client can create one
/// with a name of its choosing, so none is a queue of this service.
pub const SERVER_NAMED: &str = "amq.gen-";

/// Whether a reply may go to `reply_to`: direct reply-to, a server-named queue, or a queue
/// whose name starts with `allowed` (`INGEST_REPLY_PREFIX`, `<AMQP_PREFIX>.reply.` by
/// default). Any other name (the runs queue, a work queue, another producer's queue) gets
/// nothing: a publisher must not be able to put messages into queues it names.
pub fn reply_allowed(reply_to: &str, allowed: &str) -> bool {
    reply_to == DIRECT_REPLY_TO
        || reply_to.starts_with(&format!("{DIRECT_REPLY_TO}."))
        || reply_to.starts_with(SERVER_NAMED)
        || (!allowed.is_empty() && reply_to.starts_with(allowed))
}

/// Answer a message that set `reply_to` (to a queue [`reply_allowed`] takes), with its
/// `correlation_id`: the event log, or the error, as the HTTP API's body, and the HTTP
/// status in [`STATUS_HEADER`]. A reply no queue takes is dropped by the broker: the
/// producer that asked has gone.
async fn reply(
    publisher: &Channel,
    delivery: &Delivery,
    outcome: &Fate,
    allowed: &str,
) -> Result<(), IngestRoleError> {
    let Some(reply_to) = delivery.properties.reply_to() else {
        return Ok(());
    };
    // A deferred request is answered when it comes back and is stored.
    if matches!(outcome, Fate::Deferred(_)) {
        return Ok(());
    }
    if !reply_allowed(reply_to.as_str(), allowed) {
        metrics().ingest_replies_refused.inc();
        tracing::debug!(reply_to = ?reply_to.as_str(), "reply_to names a queue replies may not go to: no reply");
        return Ok(());
    }
    let (status, body): (u16, Value) = match outcome {
        Fate::Stored(stored) => (200, event_log(&stored.record)),
        Fate::Rejected(r) => (r.reason.status(), json!({ "error": r.message })),
        Fate::Deferred(_) => return Ok(()),
    };
    let mut headers = FieldTable::default();
    headers.insert(STATUS_HEADER.into(), AMQPValue::LongInt(status as i32));
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    if let Some(c) = delivery.properties.correlation_id() {
        properties = properties.with_correlation_id(c.clone());
    }
    // An unconfirmed channel: this resolves as soon as the frame is handed over.
    publisher
        .basic_publish(
            "".into(),
            reply_to.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&body).expect("JSON serializes"),
            properties,
        )
        .await?
        .await?;
    Ok(())
}

/// Count what a batch became.
fn record(outcomes: &[Fate]) {
    let m = metrics();
    let stored = outcomes
        .iter()
        .filter(|o| matches!(o, Fate::Stored(_)))
        .count();
    m.events_ingested
        .with_label_values(&["amqp"])
        .inc_by(stored as u64);
    for o in outcomes {
        match o {
            Fate::Rejected(r) => m
                .ingest_rejected
                .with_label_values(&[r.reason.as_str()])
                .inc(),
            Fate::Deferred(_) => m.events_rate_limited.with_label_values(&["amqp"]).inc(),
            // As the API logs a send: the producer's id quoted, so it cannot forge lines.
            Fate::Stored(s) => tracing::info!(
                event_id = ?s.record.event_id,
                environment = %s.record.environment_id,
                created = s.created,
                "event accepted"
            ),
        }
    }
}
