-- The PL/pgSQL functions a job insert and a worker's take call for every job keep their
-- plans. Their queries take parameters, so under the connection's `force_custom_plan` (see
-- src/db) each call planned them again: `queue_jobs_room` cost 0.49 ms a call and
-- `queue_jobs_waiting` 0.25 ms under 200 events/s, almost all of it planning (2,000 calls
-- on a quiet machine: 206 ms against 21 ms with the plans kept, 127 ms against 13 ms).
-- Each query is a probe of one partial index by its leading columns, the plan for any
-- size of the table; `enable_seqscan = off` keeps a plan made while the table was small
-- from being a sequential scan that outlives its growth (the reason for custom plans).
ALTER FUNCTION queue_jobs_room(uuid, text)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION queue_jobs_room(uuid, text)
    SET enable_seqscan = off;
ALTER FUNCTION queue_jobs_waiting(uuid, text)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION queue_jobs_waiting(uuid, text)
    SET enable_seqscan = off;
ALTER FUNCTION run_created_message(uuid, timestamptz, uuid, uuid, uuid, uuid, uuid, text)
    SET enable_seqscan = off;
