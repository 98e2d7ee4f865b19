-- EPHEMERAL dispatchers: a URL that takes the first matching event once, before it expires.
-- `dispatchable_id` is the URL (unique per environment while the dispatcher is live); a
-- dispatcher that fired or expired gives its URL up (`dispatchable_id` becomes 'spent:<id>')
-- so the same URL can be registered again as a new dispatcher, while the old one keeps its
-- attempts readable.
ALTER TABLE event_dispatchers
    DROP CONSTRAINT event_dispatchers_dispatchable_type_check,
    ADD CONSTRAINT event_dispatchers_dispatchable_type_check
        CHECK (dispatchable_type IN ('JOB_VERSION', 'DYNAMIC_TRIGGER', 'EPHEMERAL')),
    ADD COLUMN url text,
    -- The Standard Webhooks signing secret (`whsec_` + base64 of 32 random bytes).
    ADD COLUMN secret text,
    ADD COLUMN expires_at timestamptz,
    -- When a matching event claimed it (it is then disabled: it fires once).
    ADD COLUMN fired_at timestamptz,
    -- When the receiver answered 2xx.
    ADD COLUMN delivered_at timestamptz,
    -- When its webhook job was discarded (last attempt failed, or the address refused).
    ADD COLUMN failed_at timestamptz,
    ADD CONSTRAINT event_dispatchers_ephemeral_shape CHECK (
        dispatchable_type <> 'EPHEMERAL'
        OR (url IS NOT NULL AND secret IS NOT NULL AND expires_at IS NOT NULL));

-- An ephemeral dispatcher has no job version or dynamic trigger: its target is itself.
COMMENT ON COLUMN event_dispatchers.target_id IS
    'JOB_VERSION: the job version; DYNAMIC_TRIGGER: the dynamic trigger; EPHEMERAL: its own id';

-- Every request made (or refused) for an ephemeral dispatcher.
CREATE TABLE webhook_attempts (
    id             bigserial PRIMARY KEY,
    dispatcher_id  uuid NOT NULL REFERENCES event_dispatchers (id) ON DELETE CASCADE,
    event_record_id uuid NOT NULL,
    job_id         bigint NOT NULL,
    attempt        integer NOT NULL,
    -- The HTTP status, NULL when no answer came (refused, unreachable, timed out).
    status         integer,
    duration_ms    integer NOT NULL,
    error          text,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhook_attempts_dispatcher_idx ON webhook_attempts (dispatcher_id, id);

-- The runs hand-off's outbox: one row per message owed to the runs service, written in the
-- transaction that creates (or cancels) the run; the relay builds the message from the run
-- and its event when it publishes it, and deletes the row, in its claiming transaction,
-- once the broker confirmed it. A relay that dies between confirm and commit publishes it
-- again (same message id).
CREATE TABLE run_handoffs (
    id           bigserial PRIMARY KEY,
    run_id       uuid NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('created', 'cancelled')),
    -- The trace the run's creation continues (W3C traceparent).
    trace_parent text,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- A statement that wrote hand-offs wakes the relays' hand-off loops, once, on a channel of
-- their own (the job loops' claim does not run for it).
CREATE FUNCTION run_handoffs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM written) THEN
        PERFORM pg_notify('kongflow_handoffs', '');
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER run_handoffs_notify AFTER INSERT ON run_handoffs
    REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION run_handoffs_notify();

-- A time as the API writes it: RFC 3339 in UTC with milliseconds (2026-12-03T10:00:00.123Z).
CREATE FUNCTION iso_time(t timestamptz) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;
