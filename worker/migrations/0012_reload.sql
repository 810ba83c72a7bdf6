-- Config reload (issue 10): planning of a job picks up "from now" when its schedule
-- changed or it came back after a reload removed it, decided from the ledger so that
-- the next leader does the same. `schedule` is the cron expression and timezone the
-- job was last planned with (NULL on rows from before this migration: adopted as is).
ALTER TABLE job_state ADD COLUMN schedule text;
ALTER TABLE job_state ADD COLUMN schedule_since timestamptz;
ALTER TABLE job_state ADD COLUMN removed_at timestamptz;
