-- Retention drops a slice whole and leaves its events' keys (event_keys) to be forgotten
-- after it, paced (src/events/retention.rs): a million keys deleted back to back took 2 s
-- of a core beside ingest. Each range of event ids whose slice went is listed here, from
-- before its slice is detached until its last key is forgotten. A key whose record_id lies
-- in a listed range is stale, its event older than the retention: a send of its id takes
-- the key over (its `ON CONFLICT ... DO UPDATE ... WHERE`, src/events/mod.rs) and stores
-- the event again, as it would once the key is gone. A slice is never made again for a
-- day that went (slices are made for the days ahead).
CREATE TABLE event_keys_gone (
    lower uuid PRIMARY KEY,
    upper uuid NOT NULL CHECK (upper > lower)
);

-- Delete up to `n` keys of the events with ids in [lower, upper); returns how many it
-- looked at (fewer than `n`: the range is done). The range is checked again on the row
-- deleted: a key a send took over meanwhile (its record_id now a new event's) stays.
CREATE OR REPLACE FUNCTION event_keys_forget(lower uuid, upper uuid, n int) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    batch tid[];
BEGIN
    batch := ARRAY(SELECT ctid FROM event_keys
                   WHERE record_id >= lower AND record_id < upper LIMIT n);
    DELETE FROM event_keys
    WHERE ctid = ANY (batch) AND record_id >= lower AND record_id < upper;
    RETURN cardinality(batch);
END;
$$;
