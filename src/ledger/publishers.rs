//! Who publishes the jobs their committer marked published (the fast path), so that the
//! jobs of a process that died between its commit and its publisher confirms run again
//! within seconds, not after the reconciler's margin.
//!
//! A [`Publisher`] is one process's record in `job_publishers`. Before a transaction
//! inserts (or refills) jobs it will publish itself, the process takes a [`Ticket`]: a
//! sequence number, stamped on those rows (`published_by`, `publish_seq`). The ticket is
//! settled once the broker has confirmed every message or the rest went back to the outbox.
//! Every [`HEARTBEAT`] the process writes `settled_through`, the highest number below which
//! every ticket is settled. A ticket dropped unsettled (a rolled-back transaction, a role
//! that failed between its commit and its publish) is handed back to the outbox by the next
//! heartbeat. A process whose heartbeat is older than [`STALE_AFTER`] is dead: [`reap`] (run
//! by the relay) puts its jobs stamped past `settled_through` and not final back in the
//! outbox. So a job waiting in a deep queue, its message confirmed, is never published
//! again this way; one whose confirm was not yet counted may be (a duplicate message, which
//! finds its job final and has no effect).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::{PgConnection, PgPool};
use tokio::sync::OnceCell;

use super::outbox::back_to_outbox;

/// How often a publisher writes its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// A publisher whose heartbeat is older than this is taken for dead.
pub const STALE_AFTER: Duration = Duration::from_secs(5);

/// The stamp a ticket puts on the rows it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishedBy {
    pub publisher: i64,
    pub seq: i64,
}

/// Rows of another owner's table that tickets stamp as well as jobs (the runs' hand-offs,
/// `runs::handoff::StampedHandOffs`): what settling, dropping or dying does to them. The
/// owner implements it, so this module names no table but its own and the ledger's.
pub trait Stamped: Send + Sync {
    /// The rows of `unsettled` tickets of `publisher` go back to their relay.
    fn hand_back<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        publisher: i64,
        unsettled: Unsettled<'a>,
    ) -> BoxFuture<'a, Result<u64, sqlx::Error>>;

    /// Every ticket up to `through` is settled: the rows still stamped with one were
    /// confirmed by the broker.
    fn settled<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        publisher: i64,
        through: i64,
    ) -> BoxFuture<'a, Result<u64, sqlx::Error>>;
}

/// Which of a publisher's tickets [`Stamped::hand_back`] is about.
#[derive(Debug, Clone, Copy)]
pub enum Unsettled<'a> {
    /// These, dropped unsettled by a live publisher.
    Tickets(&'a [i64]),
    /// Every one past this number: a dead publisher's, past what it said was settled.
    After(i64),
}

/// The tickets of one process: which are out, which were dropped unsettled. Pure
/// bookkeeping (unit-tested); the database side is [`Publisher`].
#[derive(Debug, Default)]
struct Book {
    next: i64,
    out: BTreeSet<i64>,
    abandoned: Vec<i64>,
}

impl Book {
    fn take(&mut self) -> i64 {
        self.next += 1;
        self.out.insert(self.next);
        self.next
    }

    fn settle(&mut self, seq: i64) {
        self.out.remove(&seq);
    }

    fn abandon(&mut self, seq: i64) {
        self.abandoned.push(seq);
    }

    /// Every ticket up to this number is settled.
    fn settled_through(&self) -> i64 {
        self.out.first().map_or(self.next, |first| first - 1)
    }
}

/// One process's record of the jobs it publishes itself. Clones share it.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    id: i64,
    book: Mutex<Book>,
    /// Registered (the first ticket waits for it), with the heartbeat started.
    registered: OnceCell<()>,
    /// The other tables its tickets stamp.
    stamped: Vec<&'static dyn Stamped>,
}

impl Publisher {
    /// A publisher whose tickets stamp jobs and the rows of `stamped`.
    pub fn new(pool: PgPool, stamped: Vec<&'static dyn Stamped>) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                // Random, so no round trip is needed to pick it; 63 bits do not collide.
                id: (rand::random::<u64>() >> 1) as i64,
                book: Mutex::default(),
                registered: OnceCell::new(),
                stamped,
            }),
        }
    }

    pub fn id(&self) -> i64 {
        self.inner.id
    }

    /// A ticket for the jobs of one transaction. The first registers the publisher (so a
    /// death after its commit is seen) and starts the heartbeat.
    pub async fn ticket(&self) -> Result<Ticket, sqlx::Error> {
        self.inner
            .registered
            .get_or_try_init(|| async {
                beat(&self.inner.pool, self.inner.id, 0).await?;
                let weak = Arc::downgrade(&self.inner);
                tokio::spawn(heartbeat(weak));
                Ok::<(), sqlx::Error>(())
            })
            .await?;
        let seq = self.inner.book.lock().expect("book lock").take();
        Ok(Ticket {
            inner: self.inner.clone(),
            seq,
            settled: false,
        })
    }

    /// Settle what is out, then remove the record: the process stops cleanly. Tickets
    /// still out are handed back to the outbox.
    pub async fn end(&self) {
        if self.inner.registered.get().is_none() {
            return;
        }
        if let Err(e) = tick(&self.inner).await {
            tracing::warn!(error = %e, "last publisher heartbeat failed; the relay will take its jobs back");
            return;
        }
        let settled = self.inner.book.lock().expect("book lock").out.is_empty();
        if settled && let Err(e) = remove(&self.inner).await {
            tracing::warn!(error = %e, "could not remove the publisher's record");
        }
    }
}

/// The jobs of one transaction that its process publishes itself. Stamp them with
/// [`Ticket::stamp`]; [`Ticket::settle`] once each is confirmed or back in the outbox.
/// Dropped unsettled, its jobs go back to the outbox at the next heartbeat.
#[derive(Debug)]
pub struct Ticket {
    inner: Arc<Inner>,
    seq: i64,
    settled: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher").field("id", &self.id).finish()
    }
}

impl Ticket {
    pub fn stamp(&self) -> PublishedBy {
        PublishedBy {
            publisher: self.inner.id,
            seq: self.seq,
        }
    }

    pub fn settle(mut self) {
        self.settled = true;
        self.inner.book.lock().expect("book lock").settle(self.seq);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.settled {
            self.inner.book.lock().expect("book lock").abandon(self.seq);
        }
    }
}

/// Write the heartbeat every [`HEARTBEAT`] while the publisher exists.
async fn heartbeat(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        if let Err(e) = tick(&inner).await {
            tracing::warn!(error = %e, "publisher heartbeat failed");
        }
    }
}

/// Every ticket settled: the other tables' rows are settled, then the record goes (one
/// transaction, so no stamped row outlives its publisher's record).
async fn remove(inner: &Inner) -> Result<(), sqlx::Error> {
    let through = inner.book.lock().expect("book lock").settled_through();
    let mut tx = inner.pool.begin().await?;
    for table in &inner.stamped {
        table.settled(&mut tx, inner.id, through).await?;
    }
    sqlx::query!("DELETE FROM job_publishers WHERE id = $1", inner.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Hand abandoned tickets' rows back to their relays, write the heartbeat, then settle the
/// other tables' rows of the tickets it says are settled.
async fn tick(inner: &Inner) -> Result<(), sqlx::Error> {
    let abandoned = std::mem::take(&mut inner.book.lock().expect("book lock").abandoned);
    if !abandoned.is_empty() {
        if let Err(e) = hand_back(&inner.pool, inner.id, &abandoned, &inner.stamped).await {
            inner
                .book
                .lock()
                .expect("book lock")
                .abandoned
                .extend(abandoned);
            return Err(e);
        }
        let mut book = inner.book.lock().expect("book lock");
        for seq in abandoned {
            book.settle(seq);
        }
    }
    let through = inner.book.lock().expect("book lock").settled_through();
    beat(&inner.pool, inner.id, through).await?;
    if !inner.stamped.is_empty() {
        let mut conn = inner.pool.acquire().await?;
        for table in &inner.stamped {
            table.settled(&mut conn, inner.id, through).await?;
        }
    }
    Ok(())
}

async fn beat(pool: &PgPool, id: i64, settled_through: i64) -> Result<(), sqlx::Error> {
    // An upsert: a publisher taken for dead while only slow comes back under its id.
    sqlx::query!(
        r#"INSERT INTO job_publishers (id, settled_through) VALUES ($1, $2)
           ON CONFLICT (id) DO UPDATE
           SET heartbeat_at = now(), settled_through = EXCLUDED.settled_through"#,
        id,
        settled_through
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// The jobs of `seqs` stamped by `publisher` and not final go back to the outbox, and the
/// other tables' rows of `seqs` to their relays.
async fn hand_back(
    pool: &PgPool,
    publisher: i64,
    seqs: &[i64],
    stamped: &[&'static dyn Stamped],
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    for table in stamped {
        table
            .hand_back(&mut tx, publisher, Unsettled::Tickets(seqs))
            .await?;
    }
    let ids = sqlx::query_scalar!(
        r#"SELECT id FROM queue_jobs
           WHERE published_by = $1 AND publish_seq = ANY($2)
             AND published_at IS NOT NULL AND state IN ('scheduled', 'available', 'retryable')
           FOR UPDATE SKIP LOCKED"#,
        publisher,
        seqs
    )
    .fetch_all(&mut *tx)
    .await?;
    let n = back_to_outbox(&mut tx, &ids).await?;
    tx.commit().await?;
    if n > 0 {
        crate::metrics::metrics()
            .jobs_recovered
            .with_label_values(&["dropped"])
            .inc_by(n);
        tracing::warn!(
            jobs = n,
            "jobs a role committed and never published went back to the outbox"
        );
    }
    Ok(n)
}

/// The publishers whose heartbeat is older than `stale`: their jobs stamped past what they
/// said was settled, and not final, go back to the outbox, the rows of `stamped` as
/// [`Stamped::hand_back`] (`Unsettled::After`) and [`Stamped::settled`] say, and their
/// records go.
/// Returns how many jobs went back.
pub async fn reap(
    pool: &PgPool,
    stale: Duration,
    stamped: &[&'static dyn Stamped],
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let dead = sqlx::query!(
        r#"SELECT id, settled_through FROM job_publishers
           WHERE heartbeat_at < now() - make_interval(secs => $1)
           FOR UPDATE SKIP LOCKED"#,
        stale.as_secs_f64()
    )
    .fetch_all(&mut *tx)
    .await?;
    if dead.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = dead.iter().map(|d| d.id).collect();
    let through: Vec<i64> = dead.iter().map(|d| d.settled_through).collect();
    let jobs = sqlx::query_scalar!(
        r#"SELECT j.id FROM queue_jobs j
           JOIN UNNEST($1::int8[], $2::int8[]) AS d(id, through)
             ON j.published_by = d.id AND j.publish_seq > d.through
           WHERE j.published_at IS NOT NULL AND j.state IN ('scheduled', 'available', 'retryable')
           FOR UPDATE OF j SKIP LOCKED"#,
        &ids,
        &through
    )
    .fetch_all(&mut *tx)
    .await?;
    let n = back_to_outbox(&mut tx, &jobs).await?;
    for table in stamped {
        for d in &dead {
            table
                .hand_back(&mut tx, d.id, Unsettled::After(d.settled_through))
                .await?;
            table.settled(&mut tx, d.id, d.settled_through).await?;
        }
    }
    sqlx::query!("DELETE FROM job_publishers WHERE id = ANY($1)", &ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    crate::metrics::metrics()
        .jobs_recovered
        .with_label_values(&["publisher_died"])
        .inc_by(n);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_through_stops_below_the_oldest_ticket_out() {
        let mut book = Book::default();
        assert_eq!(book.settled_through(), 0);
        let (a, b, c) = (book.take(), book.take(), book.take());
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(book.settled_through(), 0);
        book.settle(b);
        assert_eq!(book.settled_through(), 0, "1 is still out");
        book.settle(a);
        assert_eq!(book.settled_through(), 2);
        book.settle(c);
        assert_eq!(book.settled_through(), 3);
        book.take();
        assert_eq!(book.settled_through(), 3);
    }

    #[test]
    fn an_abandoned_ticket_holds_the_mark_until_handed_back() {
        let mut book = Book::default();
        let a = book.take();
        let b = book.take();
        book.abandon(a);
        book.settle(b);
        assert_eq!(book.settled_through(), 0);
        assert_eq!(book.abandoned, vec![a]);
        book.settle(a);
        assert_eq!(book.settled_through(), 2);
    }
}
