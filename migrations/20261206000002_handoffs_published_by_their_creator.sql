-- The run hand-off's fast path: the worker that creates runs publishes their `run.created`
-- messages itself right after its commit, as it publishes the jobs it inserts. Such rows
-- carry the stamp of the process's ticket (`published_by`, `publish_seq`, as `queue_jobs`
-- does; see `job_publishers`): no relay claims them, and their insert wakes none. Once the
-- process says a ticket is settled (its heartbeat's `settled_through`), the rows it stamped
-- were confirmed by the broker and it deletes them; the rows of a ticket it drops unsettled
-- lose their stamp (back to the relay), and so do those a dead publisher stamped past what
-- it said was settled. Rows without a stamp (cancellations, hand-offs handed back, those of
-- a build that publishes none itself) are the relay's, as before.
ALTER TABLE run_handoffs
    ADD COLUMN published_by bigint,
    ADD COLUMN publish_seq  bigint;

DROP INDEX run_handoffs_waiting;
CREATE INDEX run_handoffs_waiting ON run_handoffs (id)
    WHERE set_aside_at IS NULL AND published_by IS NULL;
CREATE INDEX run_handoffs_stamped ON run_handoffs (published_by, publish_seq)
    WHERE published_by IS NOT NULL;

-- Only a row left to the relay wakes it: inserted without a stamp, or its stamp taken away.
DROP TRIGGER run_handoffs_notify ON run_handoffs;
CREATE TRIGGER run_handoffs_notify
    AFTER INSERT OR UPDATE OF published_by ON run_handoffs FOR EACH ROW
    WHEN (NEW.published_by IS NULL)
    EXECUTE FUNCTION wake_channel('kongflow_handoffs');

-- The `run.created` message (contract version 1, `rabbitmq/schemas/run-created.v1.schema.json`)
-- of a run, as JSON text, from the run's own fields (passed in: the statement creating the
-- run cannot read its row back) and its event, job, version and account as they now stand;
-- NULL when the event is gone. One builder for the relay's claim and the creator's fast
-- path. Its lookups are by primary key, so their generic plans are the plans: made once
-- per connection, not at every call as the connection's `force_custom_plan` would.
CREATE FUNCTION run_created_message(
    p_run_id uuid, p_created_at timestamptz, p_environment_id uuid, p_job_id uuid,
    p_job_version_id uuid, p_dispatcher_id uuid, p_event_record_id uuid, p_trace_parent text)
RETURNS text LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN (
        SELECT jsonb_build_object(
            'type', 'run.created', 'version', 1,
            'runId', p_run_id, 'createdAt', iso_time(p_created_at),
            'environmentId', p_environment_id,
            'jobId', p_job_id,
            'jobSlug', (SELECT j.slug FROM jobs j WHERE j.id = p_job_id),
            'jobVersionId', p_job_version_id,
            'jobVersion', (SELECT v.version FROM job_versions v WHERE v.id = p_job_version_id),
            'dispatcherId', p_dispatcher_id,
            'event', jsonb_build_object(
                'id', e.event_id, 'recordId', e.id, 'name', e.name,
                'source', e.source, 'payload', e.payload, 'context', e.context,
                'timestamp', iso_time(e.timestamp),
                'accountId', (SELECT a.identifier FROM external_accounts a
                              WHERE a.id = e.external_account_id)),
            'traceparent', p_trace_parent)::text
        FROM event_records e WHERE e.id = p_event_record_id);
END
$$;
