//! Consuming: a consumer per kind's shard takes the next batch of deliveries and sorts the
//! arrivals (due, held until due, early, another installation's), then hands the due ones
//! to their kind's way of running.

use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use futures_util::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use super::external::Running;
use super::timer::Held;
use super::{Shard, Worker, WorkerError};
use crate::amqp::{self, JobMessage, Unrunnable, publish_job};
use crate::handlers::Execution;
use crate::ledger::JobKind;
use crate::metrics::{Stage, metrics};

/// The deliveries of a shard's consumers, merged.
type Deliveries = futures_util::stream::BoxStream<'static, lapin::Result<Delivery>>;

/// Merge consumers given highest priority first: whenever a higher one has a delivery
/// ready, it comes before any of a lower one.
fn highest_first(consumers: Vec<lapin::Consumer>) -> Deliveries {
    use futures_util::stream::{PollNext, select_with_strategy};
    let mut streams = consumers.into_iter().map(StreamExt::boxed);
    let first = streams.next().expect("a shard has a queue");
    streams.fold(first, |higher, lower| {
        select_with_strategy(higher, lower, |_: &mut ()| PollNext::Left).boxed()
    })
}

/// Due messages: to run now, or (`Err`, with the reason) to dead-letter.
pub(super) type Due = Vec<(Delivery, Result<JobMessage, Unrunnable>)>;

/// A batch of deliveries sorted by [`Worker::sort_arrivals`].
#[derive(Default)]
struct Arrived {
    /// To run now (or to dead-letter, with the reason).
    due: Due,
    /// To send back into the tiers.
    early: Vec<(Delivery, JobMessage)>,
    /// To hold until due.
    hold: Vec<Held>,
    /// Another installation's (see `amqp::owner`): given back to the queue, never run.
    foreign: Vec<Delivery>,
}

impl Worker {
    /// Consume a kind's shard: its one queue, or with quorum queues its queue of each
    /// priority level, each on its own channel, merged so that a level's ready messages are
    /// always taken before a lower level's.
    pub(super) async fn consume(
        &self,
        channels: Vec<Channel>,
        publisher: Channel,
        queue: Shard,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let Shard { kind, shard } = queue;
        let mut consumers = Vec::new();
        for (channel, (_, name)) in channels.iter().zip(self.topology.shard_queues(kind, shard)) {
            channel
                .basic_qos(self.config.worker_prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    name.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push(consumer);
        }
        let mut consumer = highest_first(consumers);
        // One `multiple` ack covers earlier deliveries of its own channel only: with several
        // channels a batch is acknowledged message by message.
        let one_channel = channels.len() == 1;
        // Messages that came out of the tiers a little before their due time wait in the
        // timer, unacknowledged, and run at their due time in batches of their own, never
        // behind a batch of fresh jobs. `holding` counts them until they are settled.
        let (to_timer, from_loop) = tokio::sync::mpsc::unbounded_channel();
        let holding = AtomicUsize::new(0);
        // An external-effect kind's messages run as tasks of their own, in its places.
        let running = match self.handlers.execution(kind) {
            Execution::ExternalEffect(effect) => Some(Running::new(effect)),
            Execution::Transactional(_) => None,
        };
        let arrivals = async {
            loop {
                let batch = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(()),
                    d = consumer.next() => self.more_of(&mut consumer, d)?,
                };
                let now = Utc::now();
                let Arrived {
                    due,
                    early,
                    hold,
                    foreign,
                } = self.sort_arrivals(kind, batch, now);
                if !foreign.is_empty() {
                    self.give_back(kind, foreign).await?;
                }
                if !hold.is_empty() {
                    holding.fetch_add(hold.len(), Ordering::SeqCst);
                    for held in hold {
                        // The timer lives as long as this loop.
                        let _ = to_timer.send(held);
                    }
                }
                if !early.is_empty() {
                    self.send_back(&publisher, queue, &early).await?;
                    for (delivery, _) in &early {
                        delivery.ack(BasicAckOptions::default()).await?;
                    }
                }
                if !due.is_empty() {
                    // One `multiple` ack may settle the batch only when the timer holds
                    // nothing unsettled: it gets its messages from this loop alone.
                    let alone = one_channel && holding.load(Ordering::SeqCst) == 0;
                    self.settle(&publisher, queue, due, now, alone, running.as_ref())
                        .await?;
                }
            }
        };
        let result = tokio::select! {
            r = arrivals => r,
            r = self.run_held(&publisher, queue, from_loop, &holding, running.as_ref()) => r,
        };
        if let Some(running) = &running {
            running.drain().await;
        }
        // Unacknowledged prefetched messages go back to the queue when the channel closes.
        for channel in channels {
            let _ = channel.close(200, "shutdown".into()).await;
        }
        result
    }

    /// Run due messages and settle them, as their kind runs: a transactional kind's as one
    /// batch ([`Worker::run_and_settle`]), an external-effect kind's each in a task of its
    /// own within the kind's places (`running`, see [`Running`]). `alone`: see
    /// [`Worker::run_and_settle`].
    pub(super) async fn settle(
        &self,
        publisher: &Channel,
        queue: Shard,
        due: Due,
        now: DateTime<Utc>,
        alone: bool,
        running: Option<&Running>,
    ) -> Result<(), WorkerError> {
        match running {
            Some(running) => self.run_apart(running, publisher, queue, due, now).await,
            None => {
                self.run_and_settle(publisher, queue.kind, due, now, alone)
                    .await
            }
        }
    }

    /// The delivery that woke the consumer and whatever else is ready, up to a batch.
    fn more_of(
        &self,
        consumer: &mut Deliveries,
        first: Option<lapin::Result<Delivery>>,
    ) -> Result<Vec<Delivery>, WorkerError> {
        let Some(first) = first else {
            return Err(WorkerError::ConsumerClosed);
        };
        let mut batch = vec![first?];
        while batch.len() < self.config.worker_batch_size {
            match consumer.next().now_or_never() {
                Some(Some(d)) => batch.push(d?),
                _ => break,
            }
        }
        Ok(batch)
    }

    /// Decide for each delivery (see [`arrival`]): due (or unrunnable: it goes to the dead
    /// letters with the batch), held until due, or early (sent back).
    fn sort_arrivals(&self, kind: JobKind, batch: Vec<Delivery>, now: DateTime<Utc>) -> Arrived {
        let mut arrived = Arrived::default();
        for delivery in batch {
            if let (Some(ours), Some(theirs)) = (
                self.topology.install(),
                crate::amqp::owner::install_of(&delivery.properties),
            ) && ours != theirs
            {
                arrived.foreign.push(delivery);
                continue;
            }
            match JobMessage::read(&delivery.data) {
                Ok(m) if m.kind != kind.as_str() => {
                    let reason = Unrunnable::WrongQueue {
                        found: m.kind,
                        queue: kind.as_str(),
                    };
                    arrived.due.push((delivery, Err(reason)));
                }
                Ok(m) => {
                    time_broker_hop(&delivery, &m, now);
                    match arrival(&m, now, self.topology.delay_lead()) {
                        Arrival::Due => arrived.due.push((delivery, Ok(m))),
                        Arrival::Hold => arrived.hold.push((m.run_at, delivery, m)),
                        Arrival::SendBack => arrived.early.push((delivery, m)),
                    }
                }
                Err(e) => arrived.due.push((delivery, Err(e))),
            }
        }
        arrived
    }

    /// Another installation's messages go back to the queue, settled before the batch
    /// they came in (whose `multiple` ack must not cover them). The consumer then pauses a
    /// second, so a broker shared by mistake does not spin it.
    async fn give_back(&self, kind: JobKind, foreign: Vec<Delivery>) -> Result<(), WorkerError> {
        metrics()
            .foreign_messages
            .with_label_values(&[kind.as_str()])
            .inc_by(foreign.len() as u64);
        tracing::error!(
            messages = foreign.len(),
            prefix = self.topology.prefix(),
            "messages of another installation on this prefix: given back, not run; give each installation its own AMQP_PREFIX"
        );
        for delivery in &foreign {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await?;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        Ok(())
    }

    /// Messages that arrived well before their due time (a delay longer than the tiers hold
    /// in one pass, or clocks apart) go back into the tiers for the remainder. The caller
    /// acknowledges the originals only after this returns: the broker confirmed the copies.
    pub(super) async fn send_back(
        &self,
        publisher: &Channel,
        Shard { kind, shard }: Shard,
        early: &[(Delivery, JobMessage)],
    ) -> Result<(), WorkerError> {
        let mut confirms = Vec::with_capacity(early.len());
        for (delivery, message) in early {
            tracing::debug!(job_id = message.id, run_at = %message.run_at, "message early, sent back into the tiers");
            let confirm = publish_job(
                publisher,
                &self.topology,
                kind,
                shard,
                message,
                delivery.properties.clone(),
                Utc::now(),
            )
            .await?;
            confirms.push(confirm);
        }
        for confirm in join_all(confirms).await {
            let confirm = confirm?;
            if !confirm.is_ack() || confirm.take_message().is_some() {
                return Err(WorkerError::SendBack);
            }
        }
        Ok(())
    }
}

/// Time the broker hop of a message that was due when published (see
/// [`crate::amqp::publish::PUBLISHED_AT_HEADER`]); a delayed message's time in the tiers is
/// not the broker's.
fn time_broker_hop(delivery: &Delivery, message: &JobMessage, now: DateTime<Utc>) {
    if let Some(published) = amqp::publish::published_at(&delivery.properties)
        && message.run_at <= published
    {
        metrics().stage_seconds(Stage::Broker, super::batch::seconds_since(published, now));
    }
}

/// What a worker does with a message when it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Due: run it.
    Due,
    /// Due within the delay lead: keep it (unacknowledged) and run it at its due time.
    Hold,
    /// Due later than that: send it back into the tiers for the remainder.
    SendBack,
}

/// The tiers deliver a message `lead` before its due time (see
/// [`crate::amqp::Topology::delay_lead`]), so what comes out of them is held for the rest;
/// anything earlier than that goes back.
pub fn arrival(message: &JobMessage, now: DateTime<Utc>, lead: std::time::Duration) -> Arrival {
    let ahead = message.run_at - now;
    if ahead <= chrono::Duration::zero() {
        Arrival::Due
    } else if ahead.to_std().is_ok_and(|a| a <= lead + HOLD_SLACK) {
        Arrival::Hold
    } else {
        Arrival::SendBack
    }
}

/// Room for clock noise on top of the lead before a message is sent back.
const HOLD_SLACK: std::time::Duration = std::time::Duration::from_millis(20);

#[cfg(test)]
mod tests {
    use super::*;

    fn due_in(ms: i64, now: DateTime<Utc>) -> JobMessage {
        JobMessage {
            v: 1,
            id: 1,
            kind: "deliverEvent".into(),
            queue: "events".into(),
            args: serde_json::json!({}),
            attempt: 0,
            run_at: now + chrono::Duration::milliseconds(ms),
        }
    }

    #[test]
    fn arrivals_run_wait_or_go_back() {
        let now = Utc::now();
        let lead = std::time::Duration::from_millis(100);
        assert_eq!(arrival(&due_in(-5, now), now, lead), Arrival::Due);
        assert_eq!(arrival(&due_in(0, now), now, lead), Arrival::Due);
        assert_eq!(arrival(&due_in(1, now), now, lead), Arrival::Hold);
        assert_eq!(arrival(&due_in(100, now), now, lead), Arrival::Hold);
        assert_eq!(arrival(&due_in(500, now), now, lead), Arrival::SendBack);
        assert_eq!(
            arrival(&due_in(1, now), now, std::time::Duration::ZERO),
            Arrival::Hold
        );
        assert_eq!(
            arrival(&due_in(30, now), now, std::time::Duration::ZERO),
            Arrival::SendBack
        );
    }
}
