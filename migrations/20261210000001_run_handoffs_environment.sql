-- A run's hand-off carries the run's environment, in its primary key, as the other tenant
-- tables do (migration 20261206200000, tests/it/tenant_keys.rs), so the table can be
-- distributed by environment. `run_handoffs` holds the hand-offs not yet published (a row
-- goes once the broker confirmed it): few rows, rebuilt in this transaction.
--
-- A hand-off whose run is gone (the claim publishes nothing for it) gets the nil UUID, the
-- ledger's "no environment". A build before this migration inserts without the column
-- during a rolling upgrade: a trigger fills it in from the run then (the run is inserted
-- earlier in the same statement, or was before; only then: the WHEN clause leaves this
-- build's inserts alone).
ALTER TABLE run_handoffs ADD COLUMN environment_id uuid;
UPDATE run_handoffs h SET environment_id = r.environment_id
FROM job_runs r WHERE r.id = h.run_id;
UPDATE run_handoffs SET environment_id = '00000000-0000-0000-0000-000000000000'
WHERE environment_id IS NULL;
ALTER TABLE run_handoffs ALTER COLUMN environment_id SET NOT NULL;

CREATE FUNCTION run_handoffs_environment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    SELECT environment_id INTO NEW.environment_id FROM job_runs WHERE id = NEW.run_id;
    RETURN NEW;
END;
$$;
CREATE TRIGGER run_handoffs_environment BEFORE INSERT ON run_handoffs
    FOR EACH ROW WHEN (NEW.environment_id IS NULL)
    EXECUTE FUNCTION run_handoffs_environment();

-- Led by the id: the hand-offs are claimed and deleted by id.
ALTER TABLE run_handoffs DROP CONSTRAINT run_handoffs_pkey,
    ADD CONSTRAINT run_handoffs_pkey PRIMARY KEY (id, environment_id);
