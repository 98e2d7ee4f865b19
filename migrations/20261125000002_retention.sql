-- Retention deletes final jobs by age: this index holds only final jobs, by when they ended.
CREATE INDEX queue_jobs_finalized_idx ON queue_jobs (finalized_at)
    WHERE state IN ('completed', 'discarded', 'cancelled');
