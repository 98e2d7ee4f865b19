-- A delayed job (published into the delay tiers ahead of its due time) counts in flight
-- from its due time for 10 seconds at most. The broker moves it to its work queue at that
-- time and a worker takes it within milliseconds; one the broker holds up longer (a tier's
-- dead-letter hop caught by the loss of a cluster node waits for the broker's confirm
-- timeout) is not in a work queue, and must not take its environment's room from the jobs
-- that are due now. A job published when due (or less than a second ahead) counts until it
-- is final, as before.
CREATE OR REPLACE FUNCTION queue_jobs_room(env uuid, job_kind text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT r.max_jobs_in_flight - (
        SELECT count(*) FROM (
            SELECT 1 FROM queue_jobs j
            WHERE j.environment_id = env AND j.kind = job_kind
              AND j.published_at IS NOT NULL
              AND j.state IN ('scheduled', 'available', 'retryable')
              AND j.run_at <= now()
              AND (j.published_at >= j.run_at - interval '1 second'
                   OR j.run_at > now() - interval '10 seconds')
            LIMIT r.max_jobs_in_flight) f)
    FROM runtime_environments r WHERE r.id = env
$$;
