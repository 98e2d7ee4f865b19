-- no-transaction
-- The jobs an operator looks for among millions of completed ones: failed (retryable,
-- discarded) and cancelled, by state and environment, in id order (the console's job list
-- and its bulk retry's count, `jobs list --state`). Only those rows have entries: a job on
-- the hot path (available, then completed) never writes this index. Built concurrently, so
-- an upgrade does not hold writes on a large ledger.
CREATE INDEX CONCURRENTLY IF NOT EXISTS queue_jobs_failed_idx
    ON queue_jobs (state, environment_id, id)
    WHERE state IN ('retryable', 'discarded', 'cancelled');
