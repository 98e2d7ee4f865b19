//! The exchanges and queues, declared idempotently at start-up and by `kongflow-events topology`.
//!
//! For every job kind `K` (`deliverEvent`, `events.invokeDispatcher`) and prefix `P`:
//!
//! - exchange `P.K`: direct, durable. The relay publishes here with the job's queue
//!   (`events`) as routing key.
//! - queue `P.K`: durable, a priority queue (`x-max-priority` 4), bound to `P.K` with key
//!   `events`. Workers for kind `K` consume from it. It is also bound to the delay exit
//!   exchange with `#.K.events`.
//! - exchange `P.dead` (fanout) and queue `P.events.dead`: dead letters, with their reason
//!   in the `x-kongflow-reason` header.
//! - the delay tiers (see [`super::tiers`]): for every level `n`, a topic exchange
//!   `P.delay.NN` and a queue `P.delay.NN.<ttl>ms` per digit, with that TTL and the next
//!   level down (or `P.delay.out`) as dead-letter exchange; `P.delay.out` is a topic
//!   exchange that hands due messages to the work queues.

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

use lapin::{Channel, ExchangeKind};

use super::tiers::{self, LEVELS};
use crate::ledger::{EVENTS_QUEUE, JobKind};

/// Highest AMQP priority in use; see [`crate::ledger::JobPriority::amqp_priority`].
pub const MAX_PRIORITY: u8 = 4;

/// The names of this deployment's exchanges and queues.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    /// `x-expires` for queues, in milliseconds: used by tests so their queues go away by
    /// themselves. `None` in production.
    queue_expires_ms: Option<u32>,
    /// How long before its due time the tiers hand a message to a worker, which holds it
    /// for the rest (see [`Topology::delay_lead`]).
    delay_lead: Duration,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            queue_expires_ms: None,
            delay_lead: Duration::ZERO,
        }
    }

    /// Deliver delayed messages `lead` before their due time; workers hold them until then.
    pub fn with_delay_lead(mut self, lead: Duration) -> Self {
        self.delay_lead = lead;
        self
    }

    /// How early the tiers deliver. Every hop through a tier adds a millisecond or more, and
    /// a broker busy with a burst of publishes enqueues late; aiming early and letting the
    /// worker wait the rest (a timer in memory, precise to the millisecond) takes that
    /// lateness out, up to the lead.
    pub fn delay_lead(&self) -> Duration {
        self.delay_lead
    }

    /// Queues that RabbitMQ deletes after `ms` milliseconds without consumers or use.
    pub fn with_queue_expiry(mut self, ms: u32) -> Self {
        self.queue_expires_ms = Some(ms);
        self
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The work exchange of a kind.
    pub fn exchange(&self, kind: JobKind) -> String {
        format!("{}.{}", self.prefix, kind.as_str())
    }

    /// The work queue of a kind.
    pub fn queue(&self, kind: JobKind) -> String {
        format!("{}.{}", self.prefix, kind.as_str())
    }

    /// The exchange of delay level `n` (0 is the shortest).
    pub fn delay_exchange(&self, n: usize) -> String {
        format!("{}.delay.{n:02}", self.prefix)
    }

    /// The tier of level `n` holding `ttl_ms`.
    pub fn delay_queue(&self, n: usize, ttl_ms: u64) -> String {
        format!("{}.delay.{n:02}.{ttl_ms}ms", self.prefix)
    }

    /// Where messages leave the tiers, due.
    pub fn delay_exit(&self) -> String {
        format!("{}.delay.out", self.prefix)
    }

    /// Where dead letters are published (fanout).
    pub fn dead_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The dead-letter queue: discarded jobs and messages no worker can run.
    pub fn dead_queue(&self) -> String {
        format!("{}.{}.dead", self.prefix, EVENTS_QUEUE)
    }

    /// Every queue, work queues first.
    pub fn all_queues(&self) -> Vec<String> {
        let mut names: Vec<String> = JobKind::ALL.iter().map(|k| self.queue(*k)).collect();
        names.push(self.dead_queue());
        names.extend(tiers::tiers().map(|(n, _, ttl)| self.delay_queue(n, ttl)));
        names
    }

    /// Every exchange.
    pub fn all_exchanges(&self) -> Vec<String> {
        let mut names: Vec<String> = JobKind::ALL.iter().map(|k| self.exchange(*k)).collect();
        names.extend((0..LEVELS).map(|n| self.delay_exchange(n)));
        names.push(self.delay_exit());
        names.push(self.dead_exchange());
        names
    }

    async fn declare_exchange(
        &self,
        channel: &Channel,
        name: &str,
        kind: ExchangeKind,
    ) -> lapin::Result<()> {
        channel
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: self.queue_expires_ms.is_some(),
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
    }

    /// A durable queue with `args` (and, for tests, `x-expires`).
    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        mut args: FieldTable,
    ) -> lapin::Result<()> {
        if let Some(ms) = self.queue_expires_ms {
            args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
        }
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map(|_| ())
    }

    async fn bind(
        &self,
        channel: &Channel,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> lapin::Result<()> {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// Declare everything. Declaring what exists with the same arguments is a no-op.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        self.declare_tiers(channel).await?;
        let dead = self.dead_exchange();
        self.declare_exchange(channel, &dead, ExchangeKind::Fanout)
            .await?;
        self.declare_queue(channel, &self.dead_queue(), FieldTable::default())
            .await?;
        self.bind(channel, &self.dead_queue(), &dead, "").await?;
        for kind in JobKind::ALL {
            let (exchange, queue) = (self.exchange(kind), self.queue(kind));
            self.declare_exchange(channel, &exchange, ExchangeKind::Direct)
                .await?;
            let mut args = FieldTable::default();
            // A priority queue, so a CRITICAL job overtakes a backlog of HIGH ones.
            args.insert(
                "x-max-priority".into(),
                AMQPValue::ShortShortUInt(MAX_PRIORITY),
            );
            self.declare_queue(channel, &queue, args).await?;
            self.bind(channel, &queue, &exchange, EVENTS_QUEUE).await?;
            let exit_key = tiers::exit_pattern(kind.as_str(), EVENTS_QUEUE);
            self.bind(channel, &queue, &self.delay_exit(), &exit_key)
                .await?;
        }
        Ok(())
    }

    /// The delay levels, from the exit up: each level's exchange, its tiers (dead-lettering
    /// to the level below) and the pass-through binding for digit 0.
    async fn declare_tiers(&self, channel: &Channel) -> lapin::Result<()> {
        self.declare_exchange(channel, &self.delay_exit(), ExchangeKind::Topic)
            .await?;
        for n in 0..LEVELS {
            let exchange = self.delay_exchange(n);
            let below = if n == 0 {
                self.delay_exit()
            } else {
                self.delay_exchange(n - 1)
            };
            self.declare_exchange(channel, &exchange, ExchangeKind::Topic)
                .await?;
            let level = tiers::level(n);
            for digit in 1..=level.max_digit {
                let ttl = level.unit_ms * digit as u64;
                let queue = self.delay_queue(n, ttl);
                let mut args = FieldTable::default();
                args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl as i64));
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(below.as_str().into()),
                );
                // Tiers never have consumers: in tests, only a long x-expires keeps them.
                self.declare_queue(channel, &queue, args).await?;
                self.bind(
                    channel,
                    &queue,
                    &exchange,
                    &tiers::binding_pattern(n, digit),
                )
                .await?;
            }
            channel
                .exchange_bind(
                    below.as_str().into(),
                    exchange.as_str().into(),
                    tiers::binding_pattern(n, 0).as_str().into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}

impl crate::config::StoreConfig {
    /// The RabbitMQ names this configuration uses.
    pub fn topology(&self) -> Topology {
        let t = Topology::new(&self.amqp_prefix)
            .with_delay_lead(Duration::from_millis(self.delay_lead_ms));
        match self.amqp_queue_expires_ms {
            Some(ms) => t.with_queue_expiry(ms),
            None => t,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix_and_the_kind() {
        let t = Topology::new("kf");
        assert_eq!(t.exchange(JobKind::DeliverEvent), "kf.deliverEvent");
        assert_eq!(
            t.queue(JobKind::InvokeDispatcher),
            "kf.events.invokeDispatcher"
        );
    }
}
