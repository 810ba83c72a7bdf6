-- Backfill (issue 10): queued runs of a past range of a job's slots, trigger `backfill`.
ALTER TABLE runs DROP CONSTRAINT runs_trigger_check;
ALTER TABLE runs ADD CONSTRAINT runs_trigger_check CHECK (trigger IN (
    'schedule', 'manual', 'resume', 'api', 'backfill'));
