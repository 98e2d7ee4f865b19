-- A hand-off whose message cannot be read or built (a payload nested deeper than JSON readers
-- take, written before ingest refused it) is set aside: kept, with why, and claimed no more,
-- so it never fails the batch of every other hand-off. An operator sees it in
-- `kongflow_handoffs_set_aside` and here (`set_aside_at IS NOT NULL`), and may hand it off
-- again by clearing `set_aside_at`, or delete it.
ALTER TABLE run_handoffs
    ADD COLUMN set_aside_at     timestamptz,
    ADD COLUMN set_aside_reason text;

CREATE INDEX run_handoffs_waiting ON run_handoffs (id) WHERE set_aside_at IS NULL;
