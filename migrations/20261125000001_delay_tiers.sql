-- Jobs are published at once, due or not (the delay tiers hold them), so the outbox index
-- no longer serves "what is due". The reconciler looks for live jobs overdue by a margin:
-- this index holds only jobs not yet final, so it stays small as the ledger grows.
CREATE INDEX queue_jobs_live_idx ON queue_jobs (run_at)
    WHERE state IN ('scheduled', 'available', 'retryable');
