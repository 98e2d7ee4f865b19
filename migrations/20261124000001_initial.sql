-- Tenants: organizations own projects, projects own environments.
CREATE TABLE organizations (
    id         uuid PRIMARY KEY,
    slug       text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projects (
    id              uuid PRIMARY KEY,
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    slug            text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (organization_id, slug)
);

CREATE TABLE runtime_environments (
    id           uuid PRIMARY KEY,
    project_id   uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    slug         text NOT NULL,
    type         text NOT NULL CHECK (type IN ('DEVELOPMENT', 'PRODUCTION', 'STAGING', 'PREVIEW')),
    -- SHA-256 of the API key; the key itself is never stored.
    api_key_hash bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, slug)
);

CREATE TABLE external_accounts (
    id             uuid PRIMARY KEY,
    environment_id uuid NOT NULL REFERENCES runtime_environments (id) ON DELETE CASCADE,
    identifier     text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (environment_id, identifier)
);

-- Rows written for every event (event_records, job_runs) carry no foreign keys. A key costs
-- a row lock on the referenced row per insert (FOR KEY SHARE), taken while other
-- transactions lock and update the same rows: an event is locked for delivery and stamped
-- delivered, an environment's row is shared by all its events. Measured on the pipeline
-- benchmark (10,000 events, 64 clients, 2 cores): about 900 events/s end to end with the
-- keys, about 2,000 without. The code keeps the references valid instead: events are
-- inserted for the environment of the caller's key, and runs by one statement that joins
-- the dispatcher, event, job and version rows that exist. Whatever deletes an environment
-- or an event must delete its events and runs too.

-- After trigger.dev's EventRecord.
CREATE TABLE event_records (
    id                  uuid PRIMARY KEY,
    environment_id      uuid NOT NULL,
    event_id            text NOT NULL,
    name                text NOT NULL,
    source              text NOT NULL DEFAULT 'trigger.dev',
    payload             jsonb NOT NULL DEFAULT 'null',
    context             jsonb NOT NULL DEFAULT 'null',
    payload_type        text NOT NULL DEFAULT 'JSON' CHECK (payload_type IN ('JSON', 'REQUEST')),
    timestamp           timestamptz NOT NULL DEFAULT now(),
    deliver_at          timestamptz NOT NULL DEFAULT now(),
    delivered_at        timestamptz,
    cancelled_at        timestamptz,
    external_account_id uuid,
    is_test             boolean NOT NULL DEFAULT false,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (environment_id, event_id)
);

-- Jobs the platform runs, registered per environment; a job points at its latest version.
CREATE TABLE jobs (
    id                uuid PRIMARY KEY,
    environment_id    uuid NOT NULL REFERENCES runtime_environments (id) ON DELETE CASCADE,
    slug              text NOT NULL,
    latest_version_id uuid,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (environment_id, slug)
);

CREATE TABLE job_versions (
    id             uuid PRIMARY KEY,
    job_id         uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    environment_id uuid NOT NULL REFERENCES runtime_environments (id) ON DELETE CASCADE,
    version        text NOT NULL,
    -- The event trigger as registered: {"event", "source", "payload", "context"}.
    trigger        jsonb NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, version)
);

ALTER TABLE jobs
    ADD CONSTRAINT jobs_latest_version_fk FOREIGN KEY (latest_version_id)
        REFERENCES job_versions (id) ON DELETE SET NULL DEFERRABLE INITIALLY DEFERRED;

CREATE TABLE dynamic_triggers (
    id             uuid PRIMARY KEY,
    environment_id uuid NOT NULL REFERENCES runtime_environments (id) ON DELETE CASCADE,
    slug           text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (environment_id, slug)
);

CREATE TABLE dynamic_trigger_jobs (
    dynamic_trigger_id uuid NOT NULL REFERENCES dynamic_triggers (id) ON DELETE CASCADE,
    job_id             uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (dynamic_trigger_id, job_id)
);

-- After trigger.dev's EventDispatcher. The dispatchable is (dispatchable_type, target_id):
-- a job version for JOB_VERSION, a dynamic trigger for DYNAMIC_TRIGGER. dispatchable_id names
-- what owns the dispatcher (the job, or a dynamic trigger's registration) and is unique per
-- environment, so re-registering updates the one dispatcher instead of adding another.
CREATE TABLE event_dispatchers (
    id                  uuid PRIMARY KEY,
    environment_id      uuid NOT NULL REFERENCES runtime_environments (id) ON DELETE CASCADE,
    event_names         text[] NOT NULL,
    source              text NOT NULL DEFAULT 'trigger.dev',
    payload_filter      jsonb,
    context_filter      jsonb,
    manual              boolean NOT NULL DEFAULT false,
    enabled             boolean NOT NULL DEFAULT true,
    dispatchable_type   text NOT NULL CHECK (dispatchable_type IN ('JOB_VERSION', 'DYNAMIC_TRIGGER')),
    dispatchable_id     text NOT NULL,
    target_id           uuid NOT NULL,
    external_account_id uuid REFERENCES external_accounts (id) ON DELETE CASCADE,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (environment_id, dispatchable_id)
);

CREATE INDEX event_dispatchers_match_idx
    ON event_dispatchers USING gin (event_names) WHERE enabled AND NOT manual;

-- Runs handed to the runs service. One event creates at most one run of a job version
-- through a dispatcher, whatever happens to the messages that carry the work.
CREATE TABLE job_runs (
    id              uuid PRIMARY KEY,
    environment_id  uuid NOT NULL,
    job_id          uuid NOT NULL,
    job_version_id  uuid NOT NULL,
    event_record_id uuid NOT NULL,
    dispatcher_id   uuid NOT NULL,
    status          text NOT NULL DEFAULT 'QUEUED',
    started_at      timestamptz,
    completed_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_record_id, dispatcher_id, job_version_id)
);

CREATE INDEX job_runs_environment_idx ON job_runs (environment_id, created_at);

-- The job ledger, which is also the transactional outbox.
CREATE TYPE queue_job_state AS ENUM
    ('scheduled', 'available', 'running', 'retryable', 'completed', 'discarded', 'cancelled');

CREATE TABLE queue_jobs (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL,
    args         jsonb NOT NULL,
    queue        text NOT NULL DEFAULT 'events',
    -- 1 is the most urgent (CRITICAL), 4 the least (LOW), as in River.
    priority     smallint NOT NULL DEFAULT 2 CHECK (priority BETWEEN 1 AND 4),
    state        queue_job_state NOT NULL,
    attempt      integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts > 0),
    run_at       timestamptz NOT NULL DEFAULT now(),
    errors       jsonb NOT NULL DEFAULT '[]',
    unique_key   bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    attempted_at timestamptz,
    finalized_at timestamptz,
    -- Set by the relay once RabbitMQ has confirmed the message; NULL means still in the outbox.
    published_at timestamptz
);

-- Unique by args: a live or completed job with the same key blocks a second one.
CREATE UNIQUE INDEX queue_jobs_unique_key_idx ON queue_jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state NOT IN ('cancelled', 'discarded');

-- The relay's work list: only unpublished rows are indexed, so it stays small.
CREATE INDEX queue_jobs_outbox_idx ON queue_jobs (run_at, id) WHERE published_at IS NULL;

-- Wake relays once per inserting statement; Postgres folds identical notifications of one
-- transaction into one.
CREATE FUNCTION queue_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kongflow_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER queue_jobs_notify_insert
    AFTER INSERT ON queue_jobs FOR EACH STATEMENT EXECUTE FUNCTION queue_jobs_notify();
