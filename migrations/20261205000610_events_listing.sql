-- Listing an environment's events (`GET /api/v1/events`, `events list`): newest first, a
-- page at a time by (timestamp, id), optionally since/until a time. One index serves the
-- order, the time range and the page's cursor; the name and state filters are checked on
-- the rows it walks.
CREATE INDEX event_records_environment_timestamp_idx
    ON event_records (environment_id, timestamp, id);
