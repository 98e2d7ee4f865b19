//! Integration tests: the real Postgres and the real RabbitMQ, one database and one name
//! prefix per test, so tests run in parallel.

mod bounds;
mod brokers;
mod cluster;
mod config;
mod console;
mod crash;
mod delays;
mod deploy;
mod docs;
mod events_api;
mod events_list;
mod examples;
mod fairness;
mod fast_path;
mod filters;
mod handoff;
mod helpers;
mod http_api;
mod image;
mod ingest;
mod ledger;
mod observability;
mod openapi;
mod pipeline;
mod retention;
mod retries;
mod sdk;
mod setup_timing;
mod shards;
mod structure;
mod tenant_keys;
mod tls;
mod triggers_api;
mod upgrade;
mod webhooks;
