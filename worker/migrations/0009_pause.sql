-- Schedule control (issue 10): a job paused by an operator, or by the leader after
-- `pause_after_failures` failed runs in a row. Slots that come due while a job is
-- paused are not owed: `resumed_at` is where planning picks up again.
ALTER TABLE job_state ADD COLUMN paused_at timestamptz;
ALTER TABLE job_state ADD COLUMN paused_by text;
ALTER TABLE job_state ADD COLUMN pause_note text;
ALTER TABLE job_state ADD COLUMN resumed_at timestamptz;
ALTER TABLE job_state ADD COLUMN last_paused_at timestamptz;
ALTER TABLE job_state ADD COLUMN failure_streak int NOT NULL DEFAULT 0;
