-- overlap = "skip" / "buffer_one" (issue 10): a slot that came due while a run of the
-- job was going, and was not run, is recorded as `skipped` (with the run it met).
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check CHECK (status IN (
    'queued', 'running', 'succeeded', 'failed', 'cancelled', 'abandoned', 'missed',
    'superseded', 'skipped'));
