-- Fair service across environments. Every job carries its environment; a job is "in
-- flight" from its publication until it is final. Each environment may have at most
-- `max_jobs_in_flight` jobs of a kind in flight (NULL: no limit): the rest wait in the
-- outbox, where the relay takes them in turn with every other environment's, so the
-- broker's work queues hold at most that many of any one environment's jobs and a quiet
-- environment's job waits behind that many of a noisy one's, not behind its backlog.
ALTER TABLE runtime_environments ADD COLUMN max_jobs_in_flight integer DEFAULT 64
    CHECK (max_jobs_in_flight IS NULL OR max_jobs_in_flight > 0);
UPDATE runtime_environments SET max_jobs_in_flight = 64;

-- Jobs of no environment (none today) share the nil UUID.
ALTER TABLE queue_jobs ADD COLUMN environment_id uuid NOT NULL
    DEFAULT '00000000-0000-0000-0000-000000000000';
UPDATE queue_jobs q SET environment_id = e.environment_id
FROM event_records e
WHERE q.state IN ('scheduled', 'available', 'retryable')
  AND e.id = (CASE q.kind WHEN 'deliverEvent' THEN q.args->>'id'
                          ELSE q.args->>'eventRecordId' END)::uuid;

-- The relay's work list by environment and kind, in the order it takes an environment's
-- share (priority, then due time).
CREATE INDEX queue_jobs_fair_outbox_idx ON queue_jobs (environment_id, kind, priority, run_at, id)
    WHERE published_at IS NULL;
-- What each environment has in flight (published, not final; due, so in a work queue).
CREATE INDEX queue_jobs_in_flight_idx ON queue_jobs (environment_id, kind, run_at)
    WHERE published_at IS NOT NULL AND state IN ('scheduled', 'available', 'retryable');

-- A due job its inserter would have published itself but for its environment's share is
-- left in the outbox without waking the relays: the workers hand it the room that their
-- completions leave (`outbox::refill`), and a relay that finds environments waiting looks
-- again every few milliseconds. Such inserts take no commit-time notification lock.
ALTER TABLE queue_jobs ADD COLUMN awaits_room boolean NOT NULL DEFAULT false;
CREATE OR REPLACE FUNCTION queue_jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted WHERE published_at IS NULL AND NOT awaits_room) THEN
        PERFORM pg_notify('kongflow_outbox', '');
    END IF;
    RETURN NULL;
END;
$$;

-- An environment's ingest rate over HTTP, in events per second (NULL: no limit); past it,
-- `429` with `Retry-After`.
ALTER TABLE runtime_environments ADD COLUMN max_events_per_second integer
    CHECK (max_events_per_second IS NULL OR max_events_per_second > 0);

-- The room an environment has for more jobs of a kind in flight: its `max_jobs_in_flight`
-- less its jobs of that kind published, not final and due; NULL when it has no limit (or no
-- environment row). The one definition the insert, the relay's claim and the workers'
-- refill share.
CREATE FUNCTION queue_jobs_room(env uuid, job_kind text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT r.max_jobs_in_flight - (
        SELECT count(*) FROM (
            SELECT 1 FROM queue_jobs j
            WHERE j.environment_id = env AND j.kind = job_kind
              AND j.published_at IS NOT NULL
              AND j.state IN ('scheduled', 'available', 'retryable')
              AND j.run_at <= now()
            LIMIT r.max_jobs_in_flight) f)
    FROM runtime_environments r WHERE r.id = env
$$;
