//! The tenant keys, checked on the migrated schema's catalog (docs/scaling.md, "Storage:
//! partitions and tenant keys"): to distribute the tables by environment (Citus), every
//! table that holds a tenant's data has `environment_id`, in its primary key and in every
//! unique index, and every foreign key between two such tables carries it on both sides.
//!
//! Every table is classified: a new table must say which kind it is. What does not hold yet
//! is listed in `NOT_YET` with the plan that changes it; an entry that has since been fixed,
//! or that names nothing, fails the test too, so the list stays the truth.

use std::collections::{BTreeMap, BTreeSet};

use kongflow_events::config::Roles;

use crate::helpers::TestApp;

/// The tenant tree: few rows, read by every node (Citus reference tables).
const REFERENCE: &[&str] = &["organizations", "projects", "runtime_environments"];

/// The installation's own bookkeeping, no tenant's data: stays on the coordinator.
const INSTALLATION: &[&str] = &[
    "_sqlx_migrations",
    "installation",
    "job_publishers",
    "console_sessions",
    // Ranges of event ids whose slice retention dropped (db::slices), no tenant's rows.
    "event_keys_gone",
];

/// Tables holding a tenant's data: distributed by `environment_id`.
const TENANT: &[&str] = &[
    "external_accounts",
    "event_records",
    "event_keys",
    "jobs",
    "job_versions",
    "dynamic_triggers",
    "dynamic_trigger_jobs",
    "event_dispatchers",
    "job_runs",
    "queue_jobs",
    "run_handoffs",
    "webhook_attempts",
];

/// (table, what: a column, an index or a foreign key's name): not keyed by tenant yet.
const NOT_YET: &[(&str, &str)] = &[
    // Builds before migration 20261206200000 name it in ON CONFLICT while a rolling upgrade
    // runs them; it goes in the migration after the next release (the new key,
    // `job_versions_environment_job_version_key`, is there beside it).
    ("job_versions", "job_versions_job_id_version_key"),
];

/// A foreign key: its table, its name, the table it references, its columns, and the
/// referenced columns they match.
type ForeignKey = (String, String, String, Vec<String>, Vec<String>);

#[tokio::test]
async fn every_tenant_table_is_keyed_by_its_environment_or_listed_with_its_plan() {
    let app = TestApp::builder().roles(Roles::NONE).start().await;
    // Every table (a partition counts as its parent), with whether it has the column, never
    // NULL (a distribution column cannot be).
    let tables: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text,
                EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid
                        AND a.attname = 'environment_id' AND a.attnotnull AND NOT a.attisdropped)
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    // Unique indexes (primary keys included) and foreign keys, with their columns; for a
    // foreign key, the referencing columns and the referenced ones.
    let uniques: Vec<(String, String, Vec<String>)> = sqlx::query_as(
        "SELECT c.relname::text, i.relname::text,
                array_agg(a.attname::text ORDER BY k.ord)
         FROM pg_index ix
         JOIN pg_class c ON c.oid = ix.indrelid
         JOIN pg_class i ON i.oid = ix.indexrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         CROSS JOIN LATERAL unnest(ix.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
         WHERE n.nspname = 'public' AND ix.indisunique AND NOT c.relispartition
         GROUP BY 1, 2",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    let foreign: Vec<ForeignKey> = sqlx::query_as(
        "SELECT c.relname::text, con.conname::text, f.relname::text,
                ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY u(k, o)
                      JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = u.k
                      ORDER BY u.o),
                ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY u(k, o)
                      JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = u.k
                      ORDER BY u.o)
         FROM pg_constraint con
         JOIN pg_class c ON c.oid = con.conrelid
         JOIN pg_class f ON f.oid = con.confrelid
         WHERE con.contype = 'f' AND NOT c.relispartition",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();

    let kind = |t: &str| -> Option<&str> {
        if TENANT.contains(&t) {
            Some("tenant")
        } else if REFERENCE.contains(&t) {
            Some("reference")
        } else if INSTALLATION.contains(&t) {
            Some("installation")
        } else {
            None
        }
    };
    let unclassified: Vec<_> = tables
        .iter()
        .filter(|(t, _)| kind(t).is_none())
        .map(|(t, _)| t.clone())
        .collect();
    assert!(
        unclassified.is_empty(),
        "tables not classified as TENANT, REFERENCE or INSTALLATION in tests/it/tenant_keys.rs: \
         {unclassified:?}"
    );
    let existing: BTreeSet<&str> = tables.iter().map(|(t, _)| t.as_str()).collect();
    for t in TENANT.iter().chain(REFERENCE).chain(INSTALLATION) {
        assert!(
            existing.contains(t),
            "{t} is classified but no longer exists"
        );
    }

    // What breaks the rule, as (table, what).
    let mut broken: BTreeMap<(String, String), String> = BTreeMap::new();
    for (t, has) in &tables {
        if kind(t) == Some("tenant") && !has {
            broken.insert(
                (t.clone(), "environment_id".into()),
                "no column, or NULL allowed".into(),
            );
        }
    }
    for (t, index, cols) in &uniques {
        if kind(t) == Some("tenant") && !cols.iter().any(|c| c == "environment_id") {
            broken.insert((t.clone(), index.clone()), format!("unique on {cols:?}"));
        }
    }
    for (t, name, to, cols, refs) in &foreign {
        let between_tenants = kind(t) == Some("tenant") && kind(to) == Some("tenant");
        let carries = cols
            .iter()
            .zip(refs)
            .any(|(c, r)| c == "environment_id" && r == "environment_id");
        if between_tenants && !carries {
            broken.insert(
                (t.clone(), name.clone()),
                format!("{cols:?} -> {to} {refs:?}"),
            );
        }
    }

    let listed: BTreeSet<(String, String)> = NOT_YET
        .iter()
        .map(|(t, w)| (t.to_string(), w.to_string()))
        .collect();
    let unlisted: Vec<_> = broken
        .iter()
        .filter(|(k, _)| !listed.contains(*k))
        .collect();
    assert!(
        unlisted.is_empty(),
        "tenant tables not keyed by environment_id (key them, or list them in NOT_YET with \
         the plan that will): {unlisted:?}"
    );
    let stale: Vec<_> = listed.iter().filter(|k| !broken.contains_key(*k)).collect();
    assert!(
        stale.is_empty(),
        "NOT_YET lists what is keyed by now, or no longer exists: remove {stale:?}"
    );
}

/// A build before the tenant keys writes `dynamic_trigger_jobs` and `webhook_attempts` rows
/// without the environment during a rolling upgrade: the row gets its parent's. A row that
/// names another environment's parent is refused by the composite foreign key.
#[tokio::test]
async fn rows_written_by_an_older_build_get_their_environment_and_cannot_cross_one() {
    let app = TestApp::builder().roles(Roles::NONE).start().await;
    let (other, _) = app.new_env("other").await;
    let env = app.env.id;
    let job: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO jobs (id, environment_id, slug) VALUES (gen_random_uuid(), $1, 'j') RETURNING id",
    )
    .bind(env)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let dispatcher: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO event_dispatchers (id, environment_id, event_names, dispatchable_type,
                                        dispatchable_id, target_id)
         VALUES (gen_random_uuid(), $1, '{e}', 'JOB_VERSION', 'j', gen_random_uuid()) RETURNING id",
    )
    .bind(env)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let trigger: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO dynamic_triggers (id, environment_id, slug)
         VALUES (gen_random_uuid(), $1, 't') RETURNING id",
    )
    .bind(env)
    .fetch_one(&app.pool)
    .await
    .unwrap();

    // As the older build wrote them: no environment_id.
    let attempt_env: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO webhook_attempts (dispatcher_id, event_record_id, job_id, attempt, duration_ms)
         VALUES ($1, uuid_v7_floor(now()), 1, 1, 5) RETURNING environment_id",
    )
    .bind(dispatcher)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempt_env, env);
    let link_env: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO dynamic_trigger_jobs (dynamic_trigger_id, job_id) VALUES ($1, $2)
         RETURNING environment_id",
    )
    .bind(trigger)
    .bind(job)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(link_env, env);
    let run: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO job_runs (id, environment_id, job_id, job_version_id, event_record_id,
                               dispatcher_id, status)
         VALUES (gen_random_uuid(), $1, $2, gen_random_uuid(), uuid_v7_floor(now()), $3,
                 'QUEUED')
         RETURNING id",
    )
    .bind(env)
    .bind(job)
    .bind(dispatcher)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let handoff_env: uuid::Uuid = sqlx::query_scalar(
        "INSERT INTO run_handoffs (run_id, kind) VALUES ($1, 'cancelled') RETURNING environment_id",
    )
    .bind(run)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(handoff_env, env);

    // Naming another environment: the parent is not found under it.
    let crossed = sqlx::query(
        "INSERT INTO webhook_attempts (environment_id, dispatcher_id, event_record_id, job_id,
                                       attempt, duration_ms)
         VALUES ($1, $2, uuid_v7_floor(now()), 1, 2, 5)",
    )
    .bind(other.id)
    .bind(dispatcher)
    .execute(&app.pool)
    .await
    .unwrap_err();
    assert!(
        crossed
            .to_string()
            .contains("webhook_attempts_dispatcher_fkey"),
        "{crossed}"
    );
    let crossed = sqlx::query(
        "INSERT INTO dynamic_trigger_jobs (environment_id, dynamic_trigger_id, job_id)
         VALUES ($1, $2, $3)",
    )
    .bind(other.id)
    .bind(trigger)
    .bind(job)
    .execute(&app.pool)
    .await
    .unwrap_err();
    assert!(
        crossed
            .to_string()
            .contains("dynamic_trigger_jobs_trigger_fkey"),
        "{crossed}"
    );
    // Deleting the dispatcher takes its attempts along, as before.
    sqlx::query("DELETE FROM event_dispatchers WHERE id = $1")
        .bind(dispatcher)
        .execute(&app.pool)
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_attempts")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}
