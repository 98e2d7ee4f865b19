//! Workers: consume job messages and run their jobs, each kind as its handler says
//! ([`crate::handlers::Execution`]); the worker names no kind.
//!
//! - [`consume`]: a consumer per kind's shard takes the next batch of deliveries (up to
//!   `worker_batch_size`, from what the prefetch already holds) and sorts the arrivals: due,
//!   held until due, early (sent back into the tiers), or another installation's.
//! - [`timer`]: delayed jobs come out of the delay tiers a little before they are due (the
//!   topology's delay lead): the consumer hands such a message, unacknowledged, to its
//!   timer, which holds it in due order and runs it when it is due, in a batch of its own,
//!   concurrently with the consumer's batches of fresh jobs (so it never waits behind one).
//! - [`batch`]: a batch of a transactional kind runs in one transaction: the job rows are
//!   locked in id order, the handler runs, the jobs are marked completed, the transaction
//!   commits, and only then are the messages acknowledged. A job already final (a duplicate
//!   message, a redelivery after a crash between commit and ack) is acknowledged with no
//!   effect. If the handler fails, the batch is rolled back and its jobs run one
//!   transaction each, so one bad job cannot hold back the others; a job that fails alone
//!   records its error and goes back to the outbox for a later attempt, or is discarded
//!   after its last one.
//! - [`external`]: a message of an external-effect kind runs as a task of its own within
//!   the kind's places: its job leased, the effect made holding no transaction, then the
//!   job completed in a transaction of its own, or its failure recorded.

mod batch;
mod consume;
mod external;
mod timer;

use lapin::Connection;
use lapin::options::ConfirmSelectOptions;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::amqp::{self, DirectPublisher, Topology};
use crate::config::WorkerConfig;
use crate::handlers::Handlers;
use crate::ledger::JobKind;
use crate::metrics::ConnectedGuard;

pub use consume::{Arrival, arrival};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker closed the consumer")]
    ConsumerClosed,
    #[error("a consumer task failed: {0}")]
    Task(String),
    #[error("the broker did not take a message back (early or dead)")]
    SendBack,
}

/// What to do with a message once its batch is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Ack,
    /// Copy it to the dead-letter queue with this reason, then acknowledge it: it names no
    /// job this worker can run (it does not parse, its kind is unknown, or the ledger has
    /// no such job).
    DeadLetter(String),
}

/// One work queue: a kind's shard.
#[derive(Debug, Clone, Copy)]
struct Shard {
    kind: JobKind,
    shard: u16,
}

#[derive(Clone)]
pub struct Worker {
    pool: PgPool,
    topology: Topology,
    config: WorkerConfig,
    /// Publishes the jobs the handlers insert right after their batch commits; without one,
    /// the relay publishes them.
    publisher: Option<DirectPublisher>,
    /// How each kind runs.
    handlers: Handlers,
}

impl Worker {
    pub fn new(pool: PgPool, topology: Topology, config: WorkerConfig) -> Self {
        Self {
            handlers: Handlers::new(&config),
            pool,
            topology,
            config,
            publisher: None,
        }
    }

    /// Publish the jobs handlers insert with `publisher`, right after each commit.
    pub fn publishing(self, publisher: DirectPublisher) -> Self {
        Self {
            publisher: Some(publisher),
            ..self
        }
    }

    /// Run until `shutdown`, reconnecting with backoff.
    pub async fn run(self, amqp_url: String, shutdown: CancellationToken) {
        crate::supervise::supervise_connected(
            "worker",
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
    ) -> Result<(), WorkerError> {
        let conn: Connection = amqp::connect_declared(url, "worker", &self.topology).await?;
        // Messages that arrive early go back into the tiers through this channel.
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let _connected = ConnectedGuard::new("worker");
        let mut tasks = JoinSet::new();
        let shards = self.shards();
        for kind in JobKind::ALL {
            for &shard in &shards {
                for _ in 0..self.config.worker_concurrency.max(1) {
                    // A channel per queue of the shard (one, or one per priority level).
                    let mut channels = Vec::new();
                    for _ in self.topology.shard_queues(kind, shard) {
                        channels.push(conn.create_channel().await?);
                    }
                    let this = self.clone();
                    let shutdown = shutdown.clone();
                    let publisher = publisher.clone();
                    let queue = Shard { kind, shard };
                    tasks.spawn(
                        async move { this.consume(channels, publisher, queue, shutdown).await },
                    );
                }
            }
        }
        tracing::info!(?shards, "worker connected");
        let result = crate::supervise::until_first_failure(tasks, WorkerError::Task).await;
        let _ = conn.close(200, "bye".into()).await;
        result
    }

    /// The shards this worker consumes (the process checked the configuration at start).
    pub fn shards(&self) -> Vec<u16> {
        self.config
            .shards_of(self.topology.shard_count())
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "the worker consumes no shard");
                Vec::new()
            })
    }
}
