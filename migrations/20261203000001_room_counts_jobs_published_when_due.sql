-- Room in flight counts the jobs published when due (or less than a second ahead), until
-- they are final: those are in a work queue. A delayed job, published into the delay tiers
-- well ahead of its due time, no longer counts once due. Its publication never waited for
-- room (only due jobs do), so counting it throttled only its environment's other jobs; and
-- when the broker holds delayed jobs up past their due time (a tier's dead-letter hop
-- caught by the loss of a cluster node waits for the broker's confirm timeout), the jobs
-- due meanwhile kept the room and stopped every job due now for as long: 30 s and more in
-- the three-node cluster test. A burst of delayed jobs coming due lands in the work queue
-- as it did before; what this changes is that the environment's jobs due now may add at
-- most `max_jobs_in_flight` more behind it.
CREATE OR REPLACE FUNCTION queue_jobs_room(env uuid, job_kind text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT r.max_jobs_in_flight - (
        SELECT count(*) FROM (
            SELECT 1 FROM queue_jobs j
            WHERE j.environment_id = env AND j.kind = job_kind
              AND j.published_at IS NOT NULL
              AND j.state IN ('scheduled', 'available', 'retryable')
              AND j.run_at <= now()
              AND j.published_at >= j.run_at - interval '1 second'
            LIMIT r.max_jobs_in_flight) f)
    FROM runtime_environments r WHERE r.id = env
$$;
