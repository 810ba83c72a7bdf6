-- How runs end, told apart (issue 7):
-- * `superseded`: a resume dropped because a newer complete pass of its job finished
--   first (running it would redo old pages and could mark gone what the newer saw);
-- * `handed_off`: abandoned because leadership ended (shutdown, step-down), not because
--   the run failed; such an ending does not spend the run's resume budget;
-- * `given_up_at`: the resume chain ran out of attempts; nothing continues it.
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check CHECK (status IN (
    'queued', 'running', 'succeeded', 'failed', 'cancelled', 'abandoned', 'missed',
    'superseded'));
ALTER TABLE runs ADD COLUMN handed_off boolean NOT NULL DEFAULT false;
ALTER TABLE runs ADD COLUMN given_up_at timestamptz;
CREATE INDEX runs_job_status ON runs (job, status) WHERE status IN ('queued', 'running');

-- A job whose slot planning failed (the leader logs it, counts it and goes on with the
-- other jobs); shown by every replica's /jobs and status page.
ALTER TABLE job_state ADD COLUMN error text;
ALTER TABLE job_state ADD COLUMN error_at timestamptz;
