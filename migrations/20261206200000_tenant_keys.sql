-- Tenant keys for the tables registered per environment (docs/scaling.md, "Storage:
-- partitions and tenant keys"): each carries its environment, in its primary key, and the
-- foreign keys between them carry it on both sides, so the tables can be distributed by
-- environment (Citus) without redesign. tests/it/tenant_keys.rs checks the catalog. The
-- event-sized tables (event_records, job_runs, queue_jobs, run_handoffs) get theirs with
-- their time partitions. These tables are small (a row per registration, per webhook
-- attempt): rebuilt in this transaction.

-- Rows that reached their environment through another row carry it. A build before this
-- migration inserts without it during a rolling upgrade: a trigger fills it in then (and
-- only then: the WHEN clause leaves this build's inserts alone).
ALTER TABLE dynamic_trigger_jobs ADD COLUMN environment_id uuid;
UPDATE dynamic_trigger_jobs j SET environment_id = t.environment_id
FROM dynamic_triggers t WHERE t.id = j.dynamic_trigger_id;
ALTER TABLE dynamic_trigger_jobs ALTER COLUMN environment_id SET NOT NULL;

CREATE FUNCTION dynamic_trigger_jobs_environment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT environment_id INTO NEW.environment_id FROM dynamic_triggers
    WHERE id = NEW.dynamic_trigger_id;
    RETURN NEW;
END;
$$;
CREATE TRIGGER dynamic_trigger_jobs_environment BEFORE INSERT ON dynamic_trigger_jobs
    FOR EACH ROW WHEN (NEW.environment_id IS NULL)
    EXECUTE FUNCTION dynamic_trigger_jobs_environment();

ALTER TABLE webhook_attempts ADD COLUMN environment_id uuid;
UPDATE webhook_attempts a SET environment_id = d.environment_id
FROM event_dispatchers d WHERE d.id = a.dispatcher_id;
ALTER TABLE webhook_attempts ALTER COLUMN environment_id SET NOT NULL;

CREATE FUNCTION webhook_attempts_environment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT environment_id INTO NEW.environment_id FROM event_dispatchers
    WHERE id = NEW.dispatcher_id;
    RETURN NEW;
END;
$$;
CREATE TRIGGER webhook_attempts_environment BEFORE INSERT ON webhook_attempts
    FOR EACH ROW WHEN (NEW.environment_id IS NULL)
    EXECUTE FUNCTION webhook_attempts_environment();

-- The foreign keys on a row id alone go before the keys they lean on.
ALTER TABLE job_versions DROP CONSTRAINT job_versions_job_id_fkey;
ALTER TABLE jobs DROP CONSTRAINT jobs_latest_version_fk;
ALTER TABLE dynamic_trigger_jobs
    DROP CONSTRAINT dynamic_trigger_jobs_dynamic_trigger_id_fkey,
    DROP CONSTRAINT dynamic_trigger_jobs_job_id_fkey;
ALTER TABLE event_dispatchers DROP CONSTRAINT event_dispatchers_external_account_id_fkey;
ALTER TABLE webhook_attempts DROP CONSTRAINT webhook_attempts_dispatcher_id_fkey;

-- Primary keys led by the environment; an index on the id alone keeps the lookups by id
-- (this build's and older ones') as quick as they were.
ALTER TABLE external_accounts DROP CONSTRAINT external_accounts_pkey,
    ADD PRIMARY KEY (environment_id, id);
CREATE INDEX external_accounts_id_idx ON external_accounts (id);
ALTER TABLE jobs DROP CONSTRAINT jobs_pkey, ADD PRIMARY KEY (environment_id, id);
CREATE INDEX jobs_id_idx ON jobs (id);
ALTER TABLE job_versions DROP CONSTRAINT job_versions_pkey, ADD PRIMARY KEY (environment_id, id);
CREATE INDEX job_versions_id_idx ON job_versions (id);
ALTER TABLE dynamic_triggers DROP CONSTRAINT dynamic_triggers_pkey,
    ADD PRIMARY KEY (environment_id, id);
CREATE INDEX dynamic_triggers_id_idx ON dynamic_triggers (id);
ALTER TABLE event_dispatchers DROP CONSTRAINT event_dispatchers_pkey,
    ADD PRIMARY KEY (environment_id, id);
CREATE INDEX event_dispatchers_id_idx ON event_dispatchers (id);
ALTER TABLE dynamic_trigger_jobs DROP CONSTRAINT dynamic_trigger_jobs_pkey,
    ADD PRIMARY KEY (environment_id, dynamic_trigger_id, job_id);
ALTER TABLE webhook_attempts DROP CONSTRAINT webhook_attempts_pkey,
    ADD PRIMARY KEY (environment_id, id);

-- A version is unique per job within its environment. The unique (job_id, version) stays
-- while builds before this migration may run: they name it in ON CONFLICT.
CREATE UNIQUE INDEX job_versions_environment_job_version_key
    ON job_versions (environment_id, job_id, version);

-- The foreign keys again, each carrying the environment on both sides.
ALTER TABLE job_versions ADD CONSTRAINT job_versions_job_fkey
    FOREIGN KEY (environment_id, job_id) REFERENCES jobs (environment_id, id) ON DELETE CASCADE;
-- A job's latest version: checked at commit (a job and its first version are written in one
-- transaction); versions other than the latest are the only ones ever deleted alone.
ALTER TABLE jobs ADD CONSTRAINT jobs_latest_version_fk
    FOREIGN KEY (environment_id, latest_version_id) REFERENCES job_versions (environment_id, id)
    DEFERRABLE INITIALLY DEFERRED;
ALTER TABLE dynamic_trigger_jobs
    ADD CONSTRAINT dynamic_trigger_jobs_trigger_fkey FOREIGN KEY (environment_id, dynamic_trigger_id)
        REFERENCES dynamic_triggers (environment_id, id) ON DELETE CASCADE,
    ADD CONSTRAINT dynamic_trigger_jobs_job_fkey FOREIGN KEY (environment_id, job_id)
        REFERENCES jobs (environment_id, id) ON DELETE CASCADE;
ALTER TABLE event_dispatchers ADD CONSTRAINT event_dispatchers_external_account_fkey
    FOREIGN KEY (environment_id, external_account_id)
    REFERENCES external_accounts (environment_id, id) ON DELETE CASCADE;
ALTER TABLE webhook_attempts ADD CONSTRAINT webhook_attempts_dispatcher_fkey
    FOREIGN KEY (environment_id, dispatcher_id) REFERENCES event_dispatchers (environment_id, id)
    ON DELETE CASCADE;
