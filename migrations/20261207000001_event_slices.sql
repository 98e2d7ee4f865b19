-- Time slices for the tables written per event (docs/scaling.md, Storage). This migration
-- changes no table: it adds what both layouts use, so builds from this one on run on a
-- plain `event_records` and on a partitioned one alike. `kongflow-events storage partition`
-- (src/events/slices.rs) turns the plain tables into partitioned ones, online, once no
-- older build runs: an older build's `ON CONFLICT (environment_id, event_id)` needs the
-- unique constraint that a partitioned table cannot have.

-- The smallest UUIDv7 of a moment: its Unix milliseconds in the first 48 bits, version 7,
-- the variant bits, every other bit zero. Event ids are UUIDv7 (`Uuid::now_v7` at ingest), so
-- `id >= uuid_v7_floor(t)` holds for the events stored from `t` on.
CREATE FUNCTION uuid_v7_floor(t timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM t) * 1000)::bigint), 12, '0')
            || '70008000000000000000')::uuid
$$;

-- The moment a UUIDv7 was made (its first 48 bits, milliseconds since 1970).
CREATE FUNCTION uuid_v7_time(id uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT to_timestamp(('x' || lpad(substr(replace(id::text, '-', ''), 1, 12), 16, '0'))::bit(64)::bigint
                        / 1000.0)
$$;

-- A producer's event id is stored once per environment. A unique index on a partitioned
-- table must hold its partition key (the record's id), so on sliced tables each slice has a
-- unique index of its own, and what spans slices is this: a send locks each (environment,
-- event id) it carries, in one order (no deadlock between two bulk sends), until its
-- transaction ends, and looks in every slice with a snapshot taken after the locks (a
-- VOLATILE function's statements each take their own), so it sees the other send's row
-- once that send committed. Returns the keys already stored. The lock space (two int4
-- keys, class 0x6b66) is apart from the service's other advisory locks (one int8 each).
CREATE FUNCTION event_ids_taken(envs uuid[], eids text[], OUT environment_id uuid, OUT event_id text)
RETURNS SETOF record
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(27494, k)
    FROM (SELECT DISTINCT hashtext(t.e::text || '/' || t.eid) AS k
          FROM unnest(envs, eids) AS t(e, eid) ORDER BY 1) AS keys;
    RETURN QUERY
        SELECT r.environment_id, r.event_id
        FROM unnest(envs, eids) AS t(e, eid)
        JOIN event_records r ON r.environment_id = t.e AND r.event_id = t.eid;
END;
$$;

-- The slices of the sliced tables, one a day (UTC) by the event's UUIDv7 time:
-- `event_records` by `id`, `job_runs` and `webhook_attempts` by `event_record_id`, so an
-- event, its runs and its webhook attempts share a slice and go together. Creates the
-- missing slices of the days from `from_day` to `to_day` (both included) and returns how
-- many tables it created. A slice is made empty and then attached, which takes a SHARE
-- UPDATE EXCLUSIVE lock on the parent (inserts go on). Where the tables are not sliced
-- (yet) it does nothing. A legacy slice (the table as it was before it was sliced, holding
-- everything below its cut-over) bounds the first day's slice from below.
CREATE FUNCTION event_slices_ensure(from_day date, to_day date) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    day date;
    lo uuid;
    hi uuid;
    legacy_hi uuid;
    name text;
    tbl text;
    created int := 0;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = 'event_records'::regclass) THEN
        RETURN 0;
    END IF;
    SELECT substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([0-9a-f-]{36})''\)')::uuid
    INTO legacy_hi
    FROM pg_class c WHERE c.oid = to_regclass('event_records_legacy') AND c.relispartition;
    FOR day IN SELECT generate_series(from_day, to_day, interval '1 day')::date LOOP
        lo := uuid_v7_floor(day::timestamp AT TIME ZONE 'UTC');
        hi := uuid_v7_floor((day + 1)::timestamp AT TIME ZONE 'UTC');
        IF legacy_hi IS NOT NULL THEN
            CONTINUE WHEN hi <= legacy_hi;
            lo := greatest(lo, legacy_hi);
        END IF;
        FOREACH tbl IN ARRAY ARRAY['event_records', 'job_runs', 'webhook_attempts'] LOOP
            name := tbl || '_p' || to_char(day, 'YYYYMMDD');
            CONTINUE WHEN to_regclass(name) IS NOT NULL;
            EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                           name, tbl);
            IF tbl = 'event_records' THEN
                -- Updated once (delivered): mostly HOT, given room on the page.
                EXECUTE format('ALTER TABLE %I SET (fillfactor = 90,'
                               ' autovacuum_vacuum_scale_factor = 0.05,'
                               ' autovacuum_analyze_scale_factor = 0.05)', name);
                EXECUTE format('CREATE UNIQUE INDEX %I ON %I (environment_id, event_id)',
                               name || '_event_id_key', name);
            ELSE
                EXECUTE format('ALTER TABLE %I SET (autovacuum_analyze_scale_factor = 0.05,'
                               ' autovacuum_vacuum_insert_scale_factor = 0.05)', name);
            END IF;
            EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           tbl, name, lo, hi);
            created := created + 1;
        END LOOP;
    END LOOP;
    RETURN created;
END;
$$;
