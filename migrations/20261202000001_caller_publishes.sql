-- Jobs the inserting process publishes itself right after its commit (the fast path) are
-- inserted already marked published: no relay claims them, and their insert wakes no relay.
-- Only a statement that leaves work in the outbox notifies, so a transaction that publishes
-- its own jobs takes no commit-time notification lock. Should the publish fail, the process
-- puts the jobs back in the outbox (which notifies); should it die first, the reconciler
-- publishes them once they are overdue.
CREATE OR REPLACE FUNCTION queue_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted WHERE published_at IS NULL) THEN
        PERFORM pg_notify('kongflow_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER queue_jobs_notify_insert ON queue_jobs;
CREATE TRIGGER queue_jobs_notify_insert
    AFTER INSERT ON queue_jobs REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION queue_jobs_notify();
