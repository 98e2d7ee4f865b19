-- Every state change rewrote this index; nothing on the hot path reads it.
DROP INDEX IF EXISTS queue_jobs_state_idx;
