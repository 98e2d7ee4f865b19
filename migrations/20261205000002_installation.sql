-- The identity of this installation (one database), claimed on the broker under its
-- AMQP_PREFIX at start, so that a second installation given the same prefix refuses to
-- start instead of consuming (and dead-lettering) this one's messages. Job messages carry it
-- in the `x-kongflow-install` header.
CREATE TABLE installation (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO installation DEFAULT VALUES;
