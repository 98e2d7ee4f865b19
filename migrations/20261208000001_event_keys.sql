-- A producer's event id is stored once per environment. On plain tables the unique index
-- of event_records (environment_id, event_id) holds that. A partitioned table's unique
-- index must hold its partition key (the record's id), so on sliced tables each slice has
-- one of its own, and what spans the slices is this table: one narrow row per stored event,
-- keyed by (environment, event id), not partitioned. A send inserts the keys of its events
-- first (`ON CONFLICT DO NOTHING`: a key another send holds uncommitted is waited for) and
-- stores only the events whose key it inserted: one index probe per event, as on plain
-- tables, where the look in every slice (`event_ids_taken`, kept for the previous release
-- during a rolling upgrade) costs a probe per slice.
--
-- Rows go with their events: retention deletes the keys of a slice before it drops the
-- slice (by `record_id` range: the BRIN index, as keys are written in id order), and the
-- keys of the rows it deletes one by one in the same statement.
CREATE TABLE event_keys (
    environment_id uuid NOT NULL,
    event_id text NOT NULL,
    record_id uuid NOT NULL,
    PRIMARY KEY (environment_id, event_id)
);
CREATE INDEX event_keys_record_brin ON event_keys USING brin (record_id);

-- Sends keep event_keys once the tables are sliced, and from the first step of
-- `storage partition` on (the `CHECK` it adds on the plain table, named
-- `event_records_below_cutover`: adding it waits for every send in flight, and every send
-- after it sees it), so the keys of the rows stored before can be filled in before the
-- swap. The test is written into the send's statement (src/events/mod.rs), where it is
-- planned once per connection; a SQL function would be planned at every call.

-- Fill in the keys of up to `n` stored events with ids above `after` (NULL: from the
-- first), in id order; returns the last id looked at, NULL when there were none. A key
-- already there is left as it is.
CREATE FUNCTION event_keys_fill(after uuid, n int) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    last uuid;
BEGIN
    WITH batch AS (
        SELECT id, environment_id, event_id FROM event_records
        WHERE id > COALESCE(after, '00000000-0000-0000-0000-000000000000')
        ORDER BY id LIMIT n),
    filled AS (
        INSERT INTO event_keys (environment_id, event_id, record_id)
        SELECT environment_id, event_id, id FROM batch
        ON CONFLICT DO NOTHING)
    SELECT max(id::text)::uuid INTO last FROM batch;
    RETURN last;
END;
$$;

-- Delete up to `n` keys of the events with ids in [lower, upper); returns how many went.
CREATE FUNCTION event_keys_forget(lower uuid, upper uuid, n int) RETURNS int
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM event_keys WHERE ctid = ANY (ARRAY(
            SELECT ctid FROM event_keys WHERE record_id >= lower AND record_id < upper LIMIT n))
        RETURNING 1)
    SELECT count(*)::int FROM gone
$$;

-- Tables sliced by the previous release: their keys, now.
DO $$
DECLARE
    after uuid;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'event_records'::regclass)
       OR EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'event_records'::regclass
                    AND conname = 'event_records_below_cutover') THEN
        LOOP
            after := event_keys_fill(after, 100000);
            EXIT WHEN after IS NULL;
        END LOOP;
    END IF;
END;
$$;
