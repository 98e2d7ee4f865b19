-- The W3C traceparent of the request (or job) that caused a job: relays copy it into the
-- message headers, workers into their log lines and into the jobs they cause.
ALTER TABLE queue_jobs ADD COLUMN trace_parent text;
