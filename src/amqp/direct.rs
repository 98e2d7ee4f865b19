//! The fast path: the process that commits jobs publishes them right after its commit,
//! instead of leaving them for a relay to find; a worker does the same with the run
//! hand-offs its batch wrote (on a connection of their own, in a task of their own).
//!
//! Such jobs are inserted already marked published (`InsertOpts::caller_publishes`), so no
//! relay claims them and their insert wakes no relay. After the commit, [`DirectPublisher`]
//! publishes each through [`publish_job`] (due now to the work exchange, due later into the
//! delay tiers) and waits for the broker's confirms. What the broker does not confirm (a
//! nack, a return, a timeout, a lost connection) goes back to the outbox, which wakes the
//! relays: the relay stays the guarantee. The rows carry the stamp of a
//! [`Ticket`] taken before their transaction: a process that dies between its commit and
//! its confirms stops its heartbeat, and the relay puts the jobs of its unsettled tickets
//! back in the outbox within seconds (`ledger::publishers`); a role that fails there drops
//! its ticket unsettled, and the process's next heartbeat does the same. Either way nothing
//! committed is lost, and a job published twice runs once (the worker takes only jobs that
//! are not final).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Confirmation, Connection};
use sqlx::PgPool;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::task::TaskTracker;

use super::publish::{count_published, log_published, properties, publish_handoff, publish_job};
use super::{JobMessage, Topology};
use crate::failpoint;
use crate::ledger::publishers::{Publisher, Stamped, Ticket};
use crate::ledger::{Job, outbox};
use crate::metrics::{Stage, metrics};
use crate::runs::handoff::{self, HandOff, StampedHandOffs};

/// The tables whose rows a ticket stamps besides jobs: the runs' hand-offs. Their reaper
/// (`maintenance`) is given the same list.
pub static STAMPED: &[&dyn Stamped] = &[&StampedHandOffs];

/// Publishes committed jobs on one connection of its own, opened (and the topology
/// declared) on first use and again after it drops. Clones share it.
#[derive(Clone)]
pub struct DirectPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    topology: Topology,
    pool: PgPool,
    confirm_timeout: Duration,
    /// A connection and channel for jobs, another for hand-offs: a flood's hand-offs must
    /// not queue the other environments' jobs behind them on one channel.
    links: [Mutex<Option<(Connection, Channel)>>; 2],
    /// This process's record of the jobs it marked published and has not settled.
    publisher: Publisher,
    /// Publishes started with [`DirectPublisher::publish_soon`], for
    /// [`DirectPublisher::drain`].
    running: TaskTracker,
    /// Bounds those publishes: past [`MAX_PUBLISHES_IN_FLIGHT`], a caller waits for one to
    /// end before it starts another (a slow broker slows the committers down instead of
    /// filling memory).
    in_flight: Arc<Semaphore>,
}

/// Which of [`Inner::links`] a publish goes by: hand-offs by their own.
fn link_of(handoffs: &[HandOff]) -> usize {
    usize::from(!handoffs.is_empty())
}

/// What the broker did not confirm: the ids of jobs and hand-offs.
#[derive(Debug, Default)]
struct Unconfirmed {
    jobs: Vec<i64>,
    handoffs: Vec<i64>,
}

/// How many [`DirectPublisher::publish_soon`] publishes may be under way at once.
pub const MAX_PUBLISHES_IN_FLIGHT: usize = 64;

impl DirectPublisher {
    pub fn new(url: String, topology: Topology, pool: PgPool, confirm_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                url,
                topology,
                publisher: Publisher::new(pool.clone(), STAMPED.to_vec()),
                pool,
                confirm_timeout,
                links: [Mutex::new(None), Mutex::new(None)],
                running: TaskTracker::new(),
                in_flight: Arc::new(Semaphore::new(MAX_PUBLISHES_IN_FLIGHT)),
            }),
        }
    }

    /// A ticket for the jobs one transaction is about to mark published for this process to
    /// publish (stamp them with [`Ticket::stamp`]; pass it to the publish after the commit).
    pub async fn ticket(&self) -> Result<Ticket, sqlx::Error> {
        self.inner.publisher.ticket().await
    }

    /// Publish in a task of its own (see [`DirectPublisher::publish`]), so the caller need
    /// not wait for the broker's confirms; [`DirectPublisher::drain`] waits for it. Waits
    /// only while [`MAX_PUBLISHES_IN_FLIGHT`] others are under way.
    pub async fn publish_soon(&self, jobs: Vec<Job>, ticket: Ticket) {
        if jobs.is_empty() {
            ticket.settle();
            return;
        }
        let this = self.clone();
        self.spawn_bounded(async move { this.publish(&jobs, ticket).await })
            .await;
    }

    /// Run `task` as a publish of its own: tracked for [`DirectPublisher::drain`], and
    /// started only while fewer than [`MAX_PUBLISHES_IN_FLIGHT`] are under way.
    async fn spawn_bounded(&self, task: impl Future<Output = ()> + Send + 'static) {
        let permit = self
            .inner
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        self.inner.running.spawn(async move {
            task.await;
            drop(permit);
        });
    }

    /// Wait for the publishes started with [`DirectPublisher::publish_soon`], then settle
    /// and remove this process's publisher record: a process that stops calls it once
    /// nothing can start another, before it exits.
    pub async fn drain(&self) {
        self.inner.running.close();
        self.inner.running.wait().await;
        self.inner.publisher.end().await;
    }

    /// Publish jobs whose transaction has committed ([`DirectPublisher::publish_all`], with
    /// no hand-offs).
    pub async fn publish(&self, jobs: &[Job], ticket: Ticket) {
        self.publish_all(jobs, Vec::new(), ticket).await
    }

    /// Publish the jobs and run hand-offs whose transaction has committed (inserted with
    /// `caller_publishes`, stamped with `ticket`), and settle the ticket. Never fails: what
    /// the broker does not confirm goes back to its outbox (if that fails too, the ticket
    /// is dropped unsettled and the heartbeat tries again). Jobs the insert left unmarked
    /// (their environment had no room in flight) are the relay's.
    ///
    /// The jobs are published and confirmed before it returns: the next stage waits for
    /// them, and a worker that waits takes bigger batches. The hand-offs, which nothing in
    /// this service waits for, go out in a task of their own (bounded and drained as
    /// [`DirectPublisher::publish_soon`]'s), so the worker's next batch does not wait for
    /// the runs queue's confirms; the ticket settles once both parts have.
    pub async fn publish_all(&self, jobs: &[Job], handoffs: Vec<HandOff>, ticket: Ticket) {
        let jobs: Vec<&Job> = jobs.iter().filter(|j| j.published_at.is_some()).collect();
        let jobs_settled = jobs.is_empty() || {
            failpoint::hit(failpoint::PUBLISH_AFTER_COMMIT);
            self.publish_part(&jobs, &[]).await
        };
        if handoffs.is_empty() {
            if jobs_settled {
                ticket.settle();
            }
            return;
        }
        failpoint::hit(failpoint::HANDOFF_PUBLISH_AFTER_COMMIT);
        let this = self.clone();
        self.spawn_bounded(async move {
            if this.publish_part(&[], &handoffs).await && jobs_settled {
                ticket.settle();
            }
        })
        .await;
    }

    /// Publish jobs and hand-offs and wait for their confirms; what the broker did not
    /// confirm goes back to its outbox. Returns whether all of it is settled (confirmed or
    /// back); if not, the caller drops its ticket unsettled.
    async fn publish_part(&self, jobs: &[&Job], handoffs: &[HandOff]) -> bool {
        let started = std::time::Instant::now();
        let unconfirmed = match tokio::time::timeout(
            self.inner.confirm_timeout,
            self.try_publish(jobs, handoffs),
        )
        .await
        {
            Ok(Ok(unconfirmed)) => unconfirmed,
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "confirms timed out".to_string(),
                };
                tracing::warn!(%error, jobs = jobs.len(), handoffs = handoffs.len(),
                    "direct publish failed; the relay takes the jobs and hand-offs");
                *self.inner.links[link_of(handoffs)].lock().await = None;
                Unconfirmed {
                    jobs: jobs.iter().map(|j| j.id).collect(),
                    handoffs: handoffs.iter().map(|h| h.id).collect(),
                }
            }
        };
        metrics().stage(Stage::Publish, started);
        if unconfirmed.jobs.is_empty() && unconfirmed.handoffs.is_empty() {
            return true;
        }
        let back = async {
            let mut conn = self.inner.pool.acquire().await?;
            outbox::back_to_outbox(&mut conn, &unconfirmed.jobs).await?;
            handoff::hand_back(&mut conn, &unconfirmed.handoffs).await
        };
        match back.await {
            Ok(_) => true,
            // The ticket, dropped unsettled, has the heartbeat try again.
            Err(e) => {
                tracing::error!(error = %e, jobs = ?unconfirmed.jobs, handoffs = ?unconfirmed.handoffs,
                    "could not hand unconfirmed jobs and hand-offs back to the relay; the heartbeat will");
                false
            }
        }
    }

    /// Publish every job and hand-off, then wait for every confirm. Returns those not
    /// confirmed.
    async fn try_publish(&self, jobs: &[&Job], handoffs: &[HandOff]) -> lapin::Result<Unconfirmed> {
        let channel = self.channel(link_of(handoffs)).await?;
        let now = Utc::now();
        let mut confirms = Vec::with_capacity(jobs.len());
        for job in jobs {
            let message = JobMessage::from_job(job);
            let confirm = publish_job(
                &channel,
                &self.inner.topology,
                job.kind,
                self.inner.topology.shard_of(job.environment_id),
                &message,
                properties(job),
                now,
            )
            .await?;
            confirms.push((job, confirm));
        }
        let mut handed = Vec::with_capacity(handoffs.len());
        for h in handoffs {
            // The fast path builds only run.created messages, each with its body.
            let Some(body) = &h.body else { continue };
            handed.push((
                h,
                publish_handoff(&channel, &self.inner.topology, h, body).await?,
            ));
        }
        let mut unconfirmed = Unconfirmed::default();
        for (job, confirm) in confirms {
            match confirm.await? {
                Confirmation::Ack(None) => {
                    count_published(job);
                    log_published!(job);
                }
                _ => unconfirmed.jobs.push(job.id),
            }
        }
        for (h, confirm) in handed {
            match confirm.await? {
                Confirmation::Ack(None) => handoff::count_published(h),
                _ => unconfirmed.handoffs.push(h.id),
            }
        }
        Ok(unconfirmed)
    }

    /// The channel of link `which` (see [`link_of`]), connecting first if there is none or
    /// it has closed.
    async fn channel(&self, which: usize) -> lapin::Result<Channel> {
        let mut link = self.inner.links[which].lock().await;
        if let Some((conn, channel)) = link.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let conn = super::connect(
            &self.inner.url,
            &format!("kongflow-direct:{}", self.inner.topology.prefix()),
        )
        .await?;
        let channel = conn.create_channel().await?;
        self.inner.topology.declare(&channel).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *link = Some((conn, channel.clone()));
        Ok(channel)
    }
}
