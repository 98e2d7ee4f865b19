-- Each job row is updated once when it ends, and that update is never HOT (its state is in
-- the predicates of the live and the final indexes), so queue_jobs leaves one dead row per
-- job. Autovacuum's defaults wait until a fifth of the table is dead: at hundreds of jobs a
-- second, minutes of dead entries in the indexes the workers and the reconciler walk.
ALTER TABLE queue_jobs SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02
);
-- Events are updated once, when delivered: mostly HOT, given room on their page.
ALTER TABLE event_records SET (
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);
-- Runs are inserted and kept: analyzed as they grow, for the planner.
ALTER TABLE job_runs SET (
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_insert_scale_factor = 0.05
);
