-- Statements are planned at every execution (`plan_cache_mode = force_custom_plan`, see
-- src/db), so what a statement costs to plan is paid by every event. An SQL function is
-- inlined into the statement that calls it and planned with it: `queue_jobs_room`'s count
-- doubled the planning of every job insert (measured on the insert of one job: 0.48 ms to
-- plan with the inlined count, 0.28 ms with this one). As PL/pgSQL it is a call the
-- caller's plan does not look into; its two lookups are planned on their own, cheaply.
-- Same result: the environment's `max_jobs_in_flight` less its jobs of the kind published
-- when due and not final (at most that many counted); NULL for no limit or no environment.
CREATE OR REPLACE FUNCTION queue_jobs_room(env uuid, job_kind text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    cap integer;
    used bigint;
BEGIN
    SELECT r.max_jobs_in_flight INTO cap FROM runtime_environments r WHERE r.id = env;
    IF cap IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT count(*) INTO used FROM (
        SELECT 1 FROM queue_jobs j
        WHERE j.environment_id = env AND j.kind = job_kind
          AND j.published_at IS NOT NULL
          AND j.state IN ('scheduled', 'available', 'retryable')
          AND j.run_at <= now()
          AND j.published_at >= j.run_at - interval '1 second'
        LIMIT cap) f;
    RETURN cap - used;
END
$$;

-- Whether an environment has due jobs of a kind waiting in the outbox (for room in flight,
-- or for a relay). A worker asks it of the jobs it takes, in the same statement, and hands
-- their room on (`outbox::refill`) only when some wait: most batches then skip that
-- statement. One probe of `queue_jobs_fair_outbox_idx`.
CREATE FUNCTION queue_jobs_waiting(env uuid, job_kind text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN EXISTS (
        SELECT 1 FROM queue_jobs w
        WHERE w.environment_id = env AND w.kind = job_kind AND w.published_at IS NULL
          AND w.state IN ('scheduled', 'available', 'retryable') AND w.run_at <= now());
END
$$;

-- The wake-up triggers no longer read a transition table: a statement-level trigger with one
-- keeps a copy of every inserted row for its function to scan, paid by every insert. The
-- outbox's fires per row, only for a row that needs a relay (`WHEN` false costs next to
-- nothing: the fast path's rows, published by their inserter, and the rows awaiting room
-- never wake one). The hand-off's fires once per statement that inserts into
-- `run_handoffs` (every row written there is the relay's; a statement that wrote none wakes
-- the hand-off loop for nothing, which finds nothing). A transaction's repeated
-- notifications on one channel are delivered once, as before.
CREATE FUNCTION wake_channel() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_ARGV[0], '');
    RETURN NULL;
END
$$;

DROP TRIGGER queue_jobs_notify_insert ON queue_jobs;
DROP FUNCTION queue_jobs_notify();
CREATE TRIGGER queue_jobs_notify_insert
    AFTER INSERT ON queue_jobs FOR EACH ROW
    WHEN (NEW.published_at IS NULL AND NOT NEW.awaits_room)
    EXECUTE FUNCTION wake_channel('kongflow_outbox');

DROP TRIGGER run_handoffs_notify ON run_handoffs;
DROP FUNCTION run_handoffs_notify();
CREATE TRIGGER run_handoffs_notify
    AFTER INSERT ON run_handoffs FOR EACH STATEMENT
    EXECUTE FUNCTION wake_channel('kongflow_handoffs');
