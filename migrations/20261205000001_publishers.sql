-- Who publishes a job marked published by its committer (the fast path), so that a process
-- that dies between its commit and its publisher confirms is found within seconds instead
-- of by the reconciler's margin (minutes).
--
-- Each process that publishes its own jobs registers here and writes a heartbeat every
-- second with `settled_through`: every job it stamped with a `publish_seq` up to that
-- number is settled (confirmed by the broker, or handed back to the outbox). A publisher
-- whose heartbeat is older than a few seconds is dead: the relay puts its jobs stamped past
-- `settled_through` and not final back in the outbox, and deletes its row. A job whose
-- message was confirmed and merely waits in a deep queue is never republished this way.
CREATE TABLE job_publishers (
    id              bigint PRIMARY KEY,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    settled_through bigint NOT NULL DEFAULT 0
);

-- NULL for jobs the relay publishes (its mark commits only after the confirms) and for jobs
-- in the outbox.
ALTER TABLE queue_jobs ADD COLUMN published_by bigint, ADD COLUMN publish_seq bigint;
