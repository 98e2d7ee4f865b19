//! kongflow-events: an events queue service.
//!
//! Producers send events; each one is stored in Postgres and, now or at its `deliverAt`,
//! delivered to every dispatcher whose rule matches it; each matching dispatcher is then
//! invoked and creates job runs. The work moves as jobs through a transactional outbox in
//! Postgres, a relay that publishes them to RabbitMQ, and workers that consume them.
//!
//! # Layout
//!
//! The folders follow the path of an event:
//!
//! - [`http`]: the API (routes, request and response shapes, errors to status codes).
//! - [`amqp_ingest`]: send-event requests published straight to RabbitMQ (native or
//!   CloudEvents), stored through the same path as the API's; the AMQP twin of `http`,
//!   run by the `ingest` role.
//! - [`events`]: ingest, the storing of a sent event from either transport
//!   ([`EventsService`]), the JSON of a send (`events::wire`, shared by `http` and
//!   `amqp_ingest`), listing and event filters.
//! - [`ledger`]: the job ledger that is also the outbox; the only module that writes jobs
//!   ([`QueueService`], the one way jobs enter it, for the service and library callers).
//! - [`relay`]: moves unpublished jobs from the ledger to RabbitMQ, with publisher confirms.
//! - [`maintenance`]: the passes a relay process runs beside it: the reconciler, the
//!   publisher reaper, retention, vacuum and the gauges.
//! - [`amqp`]: connections, topology, the message format and publishing; the only module
//!   that builds messages.
//! - [`worker`]: consumes messages and runs each kind's jobs as its handler says
//!   (`handlers`): a transactional kind one transaction per batch, an external-effect kind
//!   (webhooks) a task per job, its effect made holding no transaction.
//! - [`tenants`]: organizations, projects, environments, API keys and external accounts.
//! - [`db`]: pool set-up, migrations and the installation's identity.
//! - [`dispatchers`]: what events reach: jobs, their versions, dynamic triggers and the
//!   dispatchers that route events to them, with every change of a dispatcher's state
//!   (registered, fired, delivered, failed, enabled or disabled, deleted) and its webhook
//!   attempts.
//! - [`runs`]: the job runs an invocation creates, and their hand-offs to the runs service
//!   (`runs::handoff`, published by the relay).
//! - [`admin`]: the operator's commands (`jobs ...`).
//! - [`config`], [`app`]: configuration and the long-running processes, which compose the
//!   rest (`probes` serves health and metrics, `serve` runs listeners with timeouts,
//!   `supervise` restarts what fails).
//! - [`metrics`], [`dates`], [`failpoint`]: leaves every layer may use.

pub mod admin;
pub mod amqp;
pub mod amqp_ingest;
pub mod app;
pub mod config;
pub mod console;
pub mod dates;
pub mod db;
pub mod dispatchers;
pub mod events;
pub mod failpoint;
mod handlers;
pub mod http;
pub mod ledger;
pub mod maintenance;
pub mod metrics;
mod probes;
pub mod relay;
pub mod runs;
mod serve;
mod supervise;
pub mod tenants;
mod trace;
pub mod webhooks;
pub mod worker;

pub use events::EventsService;
pub use ledger::{JobInsertResult, QueueService};
