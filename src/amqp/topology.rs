//! The exchanges and queues, declared idempotently at start-up and by `kongflow-events topology`.
//!
//! For every job kind `K` (`deliverEvent`, `events.invokeDispatcher`, `deliverWebhook`) and
//! prefix `P`:
//!
//! - exchange `P.K`: direct, durable. Job messages are published here (by the committing
//!   process's direct publisher or by the relay) with the job's shard key as routing key
//!   (see [`Topology::work_key`]).
//! - the work queues of `K`, one per shard: `P.K` when there is one shard (the default),
//!   `P.K.s0` … `P.K.s<N-1>` when there are `N`. Classic queues are priority queues
//!   (`x-max-priority` [`MAX_PRIORITY`]); quorum queues have none, so a quorum shard is one
//!   queue per level (`.p<level>`, [`Topology::shard_queues`]). Each is bound to `P.K` with
//!   its shard key (`events`, `events.s<i>`, then `.p<level>` with quorum queues) and to the
//!   delay exit exchange with `#.K.<shard key>`. A job's shard is a stable hash of its
//!   environment ([`shard_of`]); workers consume every shard or the set they are given.
//! - exchange `P.dead` (fanout) and queue `P.events.dead`: dead letters, with their reason
//!   in the `x-kongflow-reason` header.
//! - exchange `P.ingest` (direct) and queue `P.ingest`, bound with key `send`: send-event
//!   requests that producers publish straight to the broker (the `ingest` role reads them);
//!   requests over their environment's rate go round the delay tiers and come back to it
//!   (routing key [`INGEST_DEFERRED`]).
//! - exchange `P.ingest.rejected` (fanout) and queue `P.ingest.rejected`: copies of the
//!   requests ingest could not store, with their reason in headers; the oldest go first
//!   past [`REJECTED_MAX_BYTES`].
//! - exchange `P.runs` (topic) and queue `P.runs`, bound with [`RUNS_BINDING`]: the run
//!   hand-off (`run.created`, `run.cancelled`) for the runs service.
//! - the delay tiers (see [`super::tiers`]): for every level `n`, a topic exchange
//!   `P.delay.NN` and a queue `P.delay.NN.<ttl>ms` per digit, with that TTL and the next
//!   level down (or `P.delay.out`) as dead-letter exchange; `P.delay.out` is a topic
//!   exchange that hands due messages to the work queues.
//! - queue `P.install` is not declared here: it is the prefix's claim by one installation
//!   (`super::owner`).
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

use lapin::{Channel, ExchangeKind};
use uuid::Uuid;

use super::tiers::{self, LEVELS};
use crate::ledger::{EVENTS_QUEUE, JobKind};

/// The routing key of send-event requests on the ingest exchange.
pub const INGEST_ROUTING_KEY: &str = "send";
/// The job kind and queue that the delay tiers' routing keys name for an ingest request sent
/// round them (one over its environment's rate): the exit exchange hands it back to the
/// ingest queue.
pub const INGEST_DEFERRED: (&str, &str) = ("ingest", "deferred");
/// What the runs queue takes from the runs exchange.
pub const RUNS_BINDING: &str = "run.#";

/// The most messages the runs queue holds under the policy the definitions carry
/// ([`Topology::runs_policy`]): a million hand-offs of about 1 KiB, a GiB of the broker's
/// disk, while no runs service consumes them.
pub const RUNS_QUEUE_BOUND: u64 = 1_000_000;

/// `text` with the characters a regular expression gives meaning to escaped.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Most bytes the rejected queue keeps (1 GiB); past it, the oldest copies are dropped.
pub const REJECTED_MAX_BYTES: i64 = 1 << 30;

/// Highest AMQP priority in use; see [`crate::ledger::JobPriority::amqp_priority`].
pub const MAX_PRIORITY: u8 = 4;

pub use crate::config::{MAX_SHARDS, QueueType};

/// The AMQP priorities of jobs, highest first (see [`crate::ledger::JobPriority::amqp_priority`]):
/// a quorum deployment has one work queue per level, consumed highest first.
pub const PRIORITY_LEVELS: [u8; 4] = [4, 3, 2, 1];

/// With quorum queues: how many times a work message may be delivered and come back
/// unacknowledged (its consumer gone) before the broker dead-letters it.
pub const WORK_DELIVERY_LIMIT: i64 = 20;

/// The level of a message that carries no priority: HIGH, the jobs' default.
pub const DEFAULT_PRIORITY: u8 = 3;

/// The work-queue level of a message's AMQP priority.
fn level_of(priority: Option<u8>) -> u8 {
    priority
        .filter(|p| *p > 0)
        .unwrap_or(DEFAULT_PRIORITY)
        .min(MAX_PRIORITY)
}

/// The shard of an environment among `count`: FNV-1a (64 bits) of the environment id's 16
/// bytes, modulo `count`. Stable across processes, versions and languages, so tools outside
/// this service can compute it too.
pub fn shard_of(environment: Uuid, count: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in environment.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % u64::from(count.max(1))) as u16
}

/// The names of this deployment's exchanges and queues.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
    /// How many shards the work queues are split into (1 or more).
    shards: u16,
    /// Classic or quorum queues.
    queue_type: QueueType,
    /// `x-expires` for queues, in milliseconds: used by tests so their queues go away by
    /// themselves. `None` in production.
    queue_expires_ms: Option<u32>,
    /// How long before its due time the tiers hand a message to a worker, which holds it
    /// for the rest (see [`Topology::delay_lead`]).
    delay_lead: Duration,
    /// The installation that owns the prefix (see `amqp::owner`): job messages carry it,
    /// and a worker leaves another installation's messages alone.
    install: Option<uuid::Uuid>,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            shards: 1,
            queue_type: QueueType::Classic,
            queue_expires_ms: None,
            delay_lead: Duration::ZERO,
            install: None,
        }
    }

    /// The installation whose messages these are.
    pub fn with_install(mut self, install: uuid::Uuid) -> Self {
        self.install = Some(install);
        self
    }

    pub fn install(&self) -> Option<uuid::Uuid> {
        self.install
    }

    /// `x-expires` of every queue, when set (tests).
    pub fn queue_expires_ms(&self) -> Option<u32> {
        self.queue_expires_ms
    }

    /// Split the work queues into `count` shards (at least 1, at most [`MAX_SHARDS`]).
    pub fn with_shards(mut self, count: u16) -> Self {
        self.shards = count.clamp(1, MAX_SHARDS);
        self
    }

    /// Declare quorum queues (or classic ones).
    pub fn with_queue_type(mut self, queue_type: QueueType) -> Self {
        self.queue_type = queue_type;
        self
    }

    pub fn queue_type(&self) -> QueueType {
        self.queue_type
    }

    /// How many shards the work queues are split into.
    pub fn shard_count(&self) -> u16 {
        self.shards
    }

    /// The shard an environment's jobs go to.
    pub fn shard_of(&self, environment: Uuid) -> u16 {
        shard_of(environment, self.shards)
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

    /// The work queue of a kind's shard: `P.K` when there is one shard, `P.K.s<shard>`
    /// when there are several. With quorum queues this names the shard, whose queues are
    /// one per priority level ([`Topology::shard_queues`]).
    pub fn queue(&self, kind: JobKind, shard: u16) -> String {
        if self.shards == 1 {
            format!("{}.{}", self.prefix, kind.as_str())
        } else {
            format!("{}.{}.s{shard}", self.prefix, kind.as_str())
        }
    }

    /// The queues of a kind's shard, highest priority first, with the level each holds:
    /// one queue (level 0: all levels, a priority queue) with classic queues; one per
    /// level, `<shard queue>.p<level>`, with quorum queues, which have no priorities.
    pub fn shard_queues(&self, kind: JobKind, shard: u16) -> Vec<(u8, String)> {
        let queue = self.queue(kind, shard);
        match self.queue_type {
            QueueType::Classic => vec![(0, queue)],
            QueueType::Quorum => PRIORITY_LEVELS
                .iter()
                .map(|p| (*p, format!("{queue}.p{p}")))
                .collect(),
        }
    }

    /// The queue of a kind's shard where a message of AMQP `priority` goes (`None`: the
    /// default level).
    pub fn queue_for(&self, kind: JobKind, shard: u16, priority: Option<u8>) -> String {
        let level = level_of(priority);
        self.shard_queues(kind, shard)
            .into_iter()
            .find(|(l, _)| *l == 0 || *l == level)
            .expect("a shard has a queue for every level")
            .1
    }

    /// Every work queue of a kind, shard 0 first.
    pub fn queues(&self, kind: JobKind) -> Vec<String> {
        (0..self.shards)
            .flat_map(|s| self.shard_queues(kind, s).into_iter().map(|(_, q)| q))
            .collect()
    }

    /// The routing key of the work queue for jobs of `queue` (River's queue name, `events`)
    /// on `shard` with AMQP `priority` (`None`: [`DEFAULT_PRIORITY`]): `queue`, then
    /// `.s<shard>` when there are several shards, then `.p<level>` with quorum queues.
    pub fn work_key(&self, queue: &str, shard: u16, priority: Option<u8>) -> String {
        let mut key = queue.to_string();
        if self.shards > 1 {
            key.push_str(&format!(".s{shard}"));
        }
        if self.queue_type == QueueType::Quorum {
            key.push_str(&format!(".p{}", level_of(priority)));
        }
        key
    }

    /// The arguments every queue of this deployment carries for its type.
    fn type_arguments(&self) -> Vec<(&'static str, Arg)> {
        match self.queue_type {
            QueueType::Classic => Vec::new(),
            QueueType::Quorum => vec![("x-queue-type", Arg::Text("quorum".into()))],
        }
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

    /// Where producers publish send-event requests (direct, key [`INGEST_ROUTING_KEY`]).
    pub fn ingest_exchange(&self) -> String {
        format!("{}.ingest", self.prefix)
    }

    /// The queue the ingest consumers read.
    pub fn ingest_queue(&self) -> String {
        format!("{}.ingest", self.prefix)
    }

    /// Where copies of requests that could not be stored are published (fanout).
    pub fn rejected_exchange(&self) -> String {
        format!("{}.ingest.rejected", self.prefix)
    }

    /// The queue that keeps those copies.
    pub fn rejected_queue(&self) -> String {
        format!("{}.ingest.rejected", self.prefix)
    }

    /// Where the runs hand-off is published (topic; keys `run.created`, `run.cancelled`).
    pub fn runs_exchange(&self) -> String {
        format!("{}.runs", self.prefix)
    }

    /// The queue that keeps the hand-off for the runs service (bound to `run.#`): messages
    /// wait there until a runs service consumes them. A runs service may bind queues of its
    /// own to the exchange as well.
    pub fn runs_queue(&self) -> String {
        format!("{}.runs", self.prefix)
    }

    /// The policy that bounds the runs queue ([`RUNS_QUEUE_BOUND`] messages; past it the
    /// broker refuses hand-offs, which wait in `run_handoffs` until there is room again),
    /// as the definitions file carries it. The runs queue is declared without a length
    /// argument, so the bound (or, for an installation with no runs service, a
    /// `message-ttl`) is the operator's to change on a running broker; docs/amqp.md.
    pub fn runs_policy(&self, vhost: &str) -> serde_json::Value {
        serde_json::json!({
            "vhost": vhost,
            "name": format!("{}-runs-bound", self.prefix),
            "pattern": format!("^{}$", regex_escape(&self.runs_queue())),
            "apply-to": "queues",
            "priority": 0,
            "definition": {"max-length": RUNS_QUEUE_BOUND, "overflow": "reject-publish"},
        })
    }

    /// Every queue, work queues first.
    pub fn all_queues(&self) -> Vec<String> {
        let mut names: Vec<String> = JobKind::ALL.iter().flat_map(|k| self.queues(*k)).collect();
        names.push(self.dead_queue());
        names.push(self.ingest_queue());
        names.push(self.rejected_queue());
        names.push(self.runs_queue());
        names.extend(tiers::tiers().map(|(n, _, ttl)| self.delay_queue(n, ttl)));
        names
    }

    /// Every exchange.
    pub fn all_exchanges(&self) -> Vec<String> {
        let mut names: Vec<String> = JobKind::ALL.iter().map(|k| self.exchange(*k)).collect();
        names.extend((0..LEVELS).map(|n| self.delay_exchange(n)));
        names.push(self.delay_exit());
        names.push(self.dead_exchange());
        names.push(self.ingest_exchange());
        names.push(self.rejected_exchange());
        names.push(self.runs_exchange());
        names
    }

    /// Everything this deployment needs on the broker, in the order it must be declared:
    /// the one description both [`Topology::declare`] and [`Topology::definitions`] use.
    pub fn plan(&self) -> Plan {
        let mut plan = Plan::default();
        self.plan_tiers(&mut plan);
        let dead = self.dead_exchange();
        plan.exchange(&dead, ExchangeKind::Fanout);
        plan.queue(&self.dead_queue(), self.type_arguments());
        plan.bind_queue(&self.dead_queue(), &dead, "");
        let (ingest, rejected) = (self.ingest_exchange(), self.rejected_exchange());
        plan.exchange(&ingest, ExchangeKind::Direct);
        plan.queue(&self.ingest_queue(), self.type_arguments());
        plan.bind_queue(&self.ingest_queue(), &ingest, INGEST_ROUTING_KEY);
        let (kind, queue) = INGEST_DEFERRED;
        plan.bind_queue(
            &self.ingest_queue(),
            &self.delay_exit(),
            &tiers::exit_pattern(kind, queue),
        );
        plan.exchange(&rejected, ExchangeKind::Fanout);
        let mut rejected_args = self.type_arguments();
        rejected_args.push(("x-max-length-bytes", Arg::Int(REJECTED_MAX_BYTES)));
        plan.queue(&self.rejected_queue(), rejected_args);
        plan.bind_queue(&self.rejected_queue(), &rejected, "");
        let runs = self.runs_exchange();
        plan.exchange(&runs, ExchangeKind::Topic);
        plan.queue(&self.runs_queue(), self.type_arguments());
        plan.bind_queue(&self.runs_queue(), &runs, RUNS_BINDING);
        for kind in JobKind::ALL {
            let exchange = self.exchange(kind);
            plan.exchange(&exchange, ExchangeKind::Direct);
            for shard in 0..self.shards {
                for (level, queue) in self.shard_queues(kind, shard) {
                    let key = self.work_key(EVENTS_QUEUE, shard, Some(level));
                    let mut args = self.type_arguments();
                    match self.queue_type {
                        // A priority queue, so a CRITICAL job overtakes a backlog of HIGH ones.
                        QueueType::Classic => {
                            args.push(("x-max-priority", Arg::Int(MAX_PRIORITY as i64)))
                        }
                        // A message that keeps coming back unacknowledged (its worker dies
                        // on it, again and again) goes to the dead letters instead of
                        // taking every worker down in turn; the ledger still holds its job.
                        QueueType::Quorum => args.extend([
                            ("x-delivery-limit", Arg::Int(WORK_DELIVERY_LIMIT)),
                            ("x-dead-letter-exchange", Arg::Text(dead.clone())),
                        ]),
                    }
                    plan.queue(&queue, args);
                    plan.bind_queue(&queue, &exchange, &key);
                    let exit_key = tiers::exit_pattern(kind.as_str(), &key);
                    plan.bind_queue(&queue, &self.delay_exit(), &exit_key);
                }
            }
        }
        plan
    }

    /// The delay levels, from the exit up: each level's exchange, its tiers (dead-lettering
    /// to the level below) and the pass-through binding for digit 0.
    fn plan_tiers(&self, plan: &mut Plan) {
        plan.exchange(&self.delay_exit(), ExchangeKind::Topic);
        for n in 0..LEVELS {
            let exchange = self.delay_exchange(n);
            let below = if n == 0 {
                self.delay_exit()
            } else {
                self.delay_exchange(n - 1)
            };
            plan.exchange(&exchange, ExchangeKind::Topic);
            let level = tiers::level(n);
            for digit in 1..=level.max_digit {
                let ttl = level.unit_ms * digit as u64;
                let queue = self.delay_queue(n, ttl);
                let mut args = self.type_arguments();
                args.extend([
                    ("x-message-ttl", Arg::Int(ttl as i64)),
                    ("x-dead-letter-exchange", Arg::Text(below.clone())),
                ]);
                if self.queue_type == QueueType::Quorum {
                    // A hop between tiers is at-least-once: the message leaves a tier only
                    // once the level below confirmed it (which needs reject-publish).
                    args.extend([
                        ("x-dead-letter-strategy", Arg::Text("at-least-once".into())),
                        ("x-overflow", Arg::Text("reject-publish".into())),
                    ]);
                }
                plan.queue(&queue, args);
                plan.bind_queue(&queue, &exchange, &tiers::binding_pattern(n, digit));
            }
            plan.bind_exchange(&below, &exchange, &tiers::binding_pattern(n, 0));
        }
    }

    /// Declare everything. Declaring what exists with the same arguments is a no-op.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let plan = self.plan();
        // Test deployments: queues expire unused, exchanges go with their last binding.
        let temporary = self.queue_expires_ms.is_some();
        for e in &plan.exchanges {
            channel
                .exchange_declare(
                    e.name.as_str().into(),
                    e.kind.clone(),
                    ExchangeDeclareOptions {
                        durable: true,
                        auto_delete: temporary,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
        }
        for q in &plan.queues {
            let mut args = field_table(&q.arguments);
            if let Some(ms) = self.queue_expires_ms {
                args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
            }
            channel
                .queue_declare(
                    q.name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args,
                )
                .await?;
        }
        for b in &plan.bindings {
            let (source, destination, key) = (
                b.source.as_str().into(),
                b.destination.as_str().into(),
                b.routing_key.as_str().into(),
            );
            if b.to_exchange {
                channel
                    .exchange_bind(
                        destination,
                        source,
                        key,
                        ExchangeBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            } else {
                channel
                    .queue_bind(
                        destination,
                        source,
                        key,
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// The plan as a RabbitMQ definitions file (`rabbitmq/definitions.json`), for a broker
    /// to import at boot into virtual host `vhost`.
    pub fn definitions(&self, vhost: &str) -> serde_json::Value {
        use serde_json::json;
        let plan = self.plan();
        json!({
            "vhosts": [{ "name": vhost }],
            "exchanges": plan.exchanges.iter().map(|e| json!({
                "name": e.name, "vhost": vhost, "type": exchange_type(&e.kind), "durable": true,
                "auto_delete": false, "internal": false, "arguments": {},
            })).collect::<Vec<_>>(),
            "queues": plan.queues.iter().map(|q| json!({
                "name": q.name, "vhost": vhost, "durable": true, "auto_delete": false,
                "arguments": q.arguments.iter().map(|(k, v)| (k.to_string(), match v {
                    Arg::Int(i) => json!(i),
                    Arg::Text(t) => json!(t),
                })).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
            "bindings": plan.bindings.iter().map(|b| json!({
                "source": b.source, "vhost": vhost, "destination": b.destination,
                "destination_type": if b.to_exchange { "exchange" } else { "queue" },
                "routing_key": b.routing_key, "arguments": {},
            })).collect::<Vec<_>>(),
            // The runs queue's bound is a policy, not a queue argument: it can be changed on
            // a running broker, and a queue declared before it keeps working.
            "policies": [self.runs_policy(vhost)],
        })
    }
}

/// An argument of a queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Int(i64),
    Text(String),
}

#[derive(Debug, Clone)]
pub struct ExchangeDecl {
    pub name: String,
    pub kind: ExchangeKind,
}

#[derive(Debug, Clone)]
pub struct QueueDecl {
    pub name: String,
    pub arguments: Vec<(&'static str, Arg)>,
}

/// A binding of a queue (or, `to_exchange`, an exchange) to a source exchange.
#[derive(Debug, Clone)]
pub struct BindingDecl {
    pub source: String,
    pub destination: String,
    pub to_exchange: bool,
    pub routing_key: String,
}

/// What the broker must have: durable exchanges, durable queues with their arguments, and
/// bindings, in declaration order.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub exchanges: Vec<ExchangeDecl>,
    pub queues: Vec<QueueDecl>,
    pub bindings: Vec<BindingDecl>,
}

impl Plan {
    fn exchange(&mut self, name: &str, kind: ExchangeKind) {
        self.exchanges.push(ExchangeDecl {
            name: name.to_string(),
            kind,
        });
    }

    fn queue(&mut self, name: &str, arguments: Vec<(&'static str, Arg)>) {
        self.queues.push(QueueDecl {
            name: name.to_string(),
            arguments,
        });
    }

    fn bind_queue(&mut self, queue: &str, source: &str, key: &str) {
        self.bindings.push(BindingDecl {
            source: source.to_string(),
            destination: queue.to_string(),
            to_exchange: false,
            routing_key: key.to_string(),
        });
    }

    fn bind_exchange(&mut self, destination: &str, source: &str, key: &str) {
        self.bindings.push(BindingDecl {
            source: source.to_string(),
            destination: destination.to_string(),
            to_exchange: true,
            routing_key: key.to_string(),
        });
    }
}

fn exchange_type(kind: &ExchangeKind) -> &'static str {
    match kind {
        ExchangeKind::Direct => "direct",
        ExchangeKind::Fanout => "fanout",
        ExchangeKind::Topic => "topic",
        ExchangeKind::Headers => "headers",
        _ => "direct",
    }
}

/// Queue arguments as AMQP values: priorities as a byte, TTLs as a long long, names as text.
fn field_table(arguments: &[(&'static str, Arg)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in arguments {
        let value = match (*k, v) {
            ("x-max-priority", Arg::Int(i)) => AMQPValue::ShortShortUInt(*i as u8),
            (_, Arg::Int(i)) => AMQPValue::LongLongInt(*i),
            (_, Arg::Text(s)) => AMQPValue::LongString(s.as_str().into()),
        };
        t.insert((*k).into(), value);
    }
    t
}

impl crate::config::StoreConfig {
    /// The RabbitMQ names this configuration uses.
    pub fn topology(&self) -> Topology {
        let t = Topology::new(&self.amqp_prefix)
            .with_shards(self.shard_count)
            .with_queue_type(self.amqp_queue_type)
            .with_delay_lead(self.delay_lead);
        match self.amqp_queue_expires {
            Some(d) => t.with_queue_expiry(u32::try_from(d.as_millis()).unwrap_or(u32::MAX)),
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
            t.queue(JobKind::InvokeDispatcher, 0),
            "kf.events.invokeDispatcher"
        );
        assert_eq!(t.work_key("events", 0, Some(4)), "events");
        let sharded = Topology::new("kf").with_shards(4);
        assert_eq!(
            sharded.queues(JobKind::DeliverEvent),
            [
                "kf.deliverEvent.s0",
                "kf.deliverEvent.s1",
                "kf.deliverEvent.s2",
                "kf.deliverEvent.s3"
            ]
        );
        assert_eq!(sharded.work_key("events", 3, None), "events.s3");
        let quorum = Topology::new("kf")
            .with_shards(2)
            .with_queue_type(QueueType::Quorum);
        assert_eq!(
            quorum.shard_queues(JobKind::DeliverEvent, 1),
            [4, 3, 2, 1].map(|p| (p, format!("kf.deliverEvent.s1.p{p}")))
        );
        assert_eq!(quorum.work_key("events", 1, Some(4)), "events.s1.p4");
        assert_eq!(quorum.work_key("events", 1, None), "events.s1.p3");
        assert_eq!(quorum.work_key("events", 1, Some(9)), "events.s1.p4");
        // Every queue is a quorum queue; the tiers dead-letter at least once; no priorities.
        let plan = quorum.plan();
        for q in &plan.queues {
            assert!(
                q.arguments
                    .contains(&("x-queue-type", Arg::Text("quorum".into()))),
                "{}",
                q.name
            );
            assert!(
                !q.arguments.iter().any(|(k, _)| *k == "x-max-priority"),
                "{}",
                q.name
            );
            if q.name.contains(".delay.") {
                assert!(
                    q.arguments
                        .contains(&("x-dead-letter-strategy", Arg::Text("at-least-once".into())))
                );
                assert!(
                    q.arguments
                        .contains(&("x-overflow", Arg::Text("reject-publish".into())))
                );
            }
        }
        // A work message that keeps coming back goes to the dead letters.
        for queue in quorum.queues(JobKind::InvokeDispatcher) {
            let declared = plan.queues.iter().find(|q| q.name == queue).unwrap();
            assert!(
                declared
                    .arguments
                    .contains(&("x-delivery-limit", Arg::Int(WORK_DELIVERY_LIMIT)))
            );
            assert!(
                declared
                    .arguments
                    .contains(&("x-dead-letter-exchange", Arg::Text(quorum.dead_exchange())))
            );
        }
        assert_eq!(quorum.queues(JobKind::DeliverEvent).len(), 8);
    }

    #[test]
    fn shards_are_a_stable_hash_of_the_environment() {
        // Fixed values: changing the hash would move every environment to another queue.
        let id = Uuid::parse_str("0190d3a2-7c1e-7b44-9a3e-5f1c2d3e4f50").unwrap();
        assert_eq!(shard_of(id, 1), 0);
        assert_eq!(shard_of(id, 8), 3);
        assert_eq!(shard_of(id, 7), 4);
        assert_eq!(shard_of(Uuid::nil(), 1000), 221);
        let counts = (0..4000u128).fold([0u32; 8], |mut c, i| {
            c[shard_of(Uuid::from_u128(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)), 8) as usize] += 1;
            c
        });
        // Spread: every shard within a fifth of the mean.
        assert!(counts.iter().all(|c| (400..=600).contains(c)), "{counts:?}");
    }
}
