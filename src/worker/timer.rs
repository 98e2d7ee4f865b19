//! Holding delayed messages: the timer of a consumer keeps the messages that came out of the
//! delay tiers a little before their due time (unacknowledged, in due order) and runs each
//! batch that falls due, beside the consumer's loop.

use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use lapin::Channel;
use lapin::message::Delivery;

use super::external::Running;
use super::{Shard, Worker, WorkerError};
use crate::amqp::JobMessage;

/// A message held until its due time.
pub(super) type Held = (DateTime<Utc>, Delivery, JobMessage);

impl Worker {
    /// The timer of a consumer: hold messages that came out of the tiers before their due
    /// time, in due order, and run each batch that falls due at once, settling its messages
    /// one by one. Ends when the consumer's loop does.
    pub(super) async fn run_held(
        &self,
        publisher: &Channel,
        queue: Shard,
        mut arriving: tokio::sync::mpsc::UnboundedReceiver<Held>,
        holding: &AtomicUsize,
        running: Option<&Running>,
    ) -> Result<(), WorkerError> {
        let mut held: Vec<Held> = Vec::new();
        loop {
            let wake = held.first().map(|(at, _, _)| instant_of(*at));
            tokio::select! {
                biased;
                _ = sleep_until_opt(wake) => {}
                next = arriving.recv() => {
                    let Some(next) = next else { return Ok(()) };
                    let pos = held.partition_point(|(t, _, _)| *t <= next.0);
                    held.insert(pos, next);
                    continue;
                }
            }
            let now = Utc::now();
            let ripe = held.partition_point(|(t, _, _)| *t <= now);
            if ripe == 0 {
                continue;
            }
            let batch: Vec<_> = held.drain(..ripe).map(|(_, d, m)| (d, Ok(m))).collect();
            let settled = batch.len();
            self.settle(publisher, queue, batch, now, false, running)
                .await?;
            holding.fetch_sub(settled, Ordering::SeqCst);
        }
    }
}

/// The tokio instant at which wall-clock time `at` comes.
fn instant_of(at: DateTime<Utc>) -> tokio::time::Instant {
    let ahead = (at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::Instant::now() + ahead
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
