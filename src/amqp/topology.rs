//! The exchanges and queues, declared idempotently at start-up and by `kongflow-events topology`.
//!
//! For every job kind `K` (`deliverEvent`, `events.invokeDispatcher`) and prefix `P`:
//!
//! - exchange `P.K`: direct, durable. The relay publishes here with the job's queue
//!   (`events`) as routing key.
//! - queue `P.K`: durable, a priority queue (`x-max-priority` 4), bound to `P.K` with key
//!   `events`. Workers for kind `K` consume from it.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::queue::{EVENTS_QUEUE, JobKind};

/// Highest AMQP priority in use; see [`crate::queue::JobPriority::amqp_priority`].
pub const MAX_PRIORITY: u8 = 4;

/// The names of this deployment's exchanges and queues.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    /// `x-expires` for queues, in milliseconds: used by tests so their queues go away by
    /// themselves. `None` in production.
    queue_expires_ms: Option<u32>,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            queue_expires_ms: None,
        }
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

    /// Declare everything. Declaring what exists with the same arguments is a no-op.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        for kind in JobKind::ALL {
            channel
                .exchange_declare(
                    self.exchange(kind).as_str().into(),
                    ExchangeKind::Direct,
                    ExchangeDeclareOptions {
                        durable: true,
                        auto_delete: self.queue_expires_ms.is_some(),
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let mut args = FieldTable::default();
            // A priority queue, so a CRITICAL job overtakes a backlog of HIGH ones.
            args.insert(
                "x-max-priority".into(),
                AMQPValue::ShortShortUInt(MAX_PRIORITY),
            );
            if let Some(ms) = self.queue_expires_ms {
                args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
            }
            channel
                .queue_declare(
                    self.queue(kind).as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args,
                )
                .await?;
            channel
                .queue_bind(
                    self.queue(kind).as_str().into(),
                    self.exchange(kind).as_str().into(),
                    EVENTS_QUEUE.into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
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
