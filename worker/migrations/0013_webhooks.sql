-- Webhooks on run completion (issue 11): an outbox written by the very statement that
-- ends a run (a trigger on `runs`), so no path that ends a run can forget it, and a
-- crash can neither lose a delivery nor make one for a run that did not end. The
-- leader delivers from it in the background (`worker/webhooks.py`).

-- Where to deliver: the leader writes the jobs file's targets here (job '*' = every job).
CREATE TABLE webhook_targets (
    job  text NOT NULL,
    url  text NOT NULL,
    PRIMARY KEY (job, url)
);

CREATE TABLE webhook_outbox (
    id               bigserial PRIMARY KEY,
    event_id         uuid NOT NULL DEFAULT gen_random_uuid() UNIQUE,
    event            text NOT NULL,
    job              text NOT NULL,
    run_id           bigint,          -- no foreign key: pruning a run keeps its deliveries' record
    url              text NOT NULL,
    payload          jsonb NOT NULL,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status      int,
    last_error       text,
    history          jsonb NOT NULL DEFAULT '[]',  -- the latest attempts: {at, status, error, ms}
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at, id) WHERE state = 'pending';
CREATE INDEX webhook_outbox_run ON webhook_outbox (run_id);

CREATE FUNCTION webhook_enqueue(ev text, j text, payload jsonb, rid bigint) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO webhook_outbox (event, job, run_id, url, payload)
    SELECT ev, j, rid, t.url, payload
    FROM (SELECT DISTINCT url FROM webhook_targets WHERE job IN ('*', j)) t
$$;

-- A run reached an end that nothing continues: succeeded, failed, cancelled, missed, or
-- a resume chain given up (its last run stays `abandoned`; the event says run.failed).
CREATE FUNCTION webhook_run_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ev text;
BEGIN
    IF NEW.status IN ('succeeded', 'failed', 'cancelled', 'missed')
       AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status) THEN
        ev := 'run.' || NEW.status;
    ELSIF TG_OP = 'UPDATE' AND NEW.given_up_at IS NOT NULL AND OLD.given_up_at IS NULL THEN
        ev := 'run.failed';
    ELSE
        RETURN NULL;
    END IF;
    PERFORM webhook_enqueue(ev, NEW.job, jsonb_build_object(
        'event', ev, 'job', NEW.job, 'run_id', NEW.id, 'slot', NEW.slot,
        'trigger', NEW.trigger, 'status', NEW.status, 'attempt', NEW.attempt,
        'stats', NEW.stats, 'error', NEW.error,
        'started_at', NEW.started_at, 'finished_at', NEW.finished_at), NEW.id);
    RETURN NULL;
END $$;

CREATE TRIGGER runs_webhook AFTER INSERT OR UPDATE OF status, given_up_at ON runs
    FOR EACH ROW EXECUTE FUNCTION webhook_run_ended();

-- A job's schedule was paused, by an operator or after repeated failures.
CREATE FUNCTION webhook_job_paused() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.paused_at IS NOT NULL
       AND (TG_OP = 'INSERT' OR OLD.paused_at IS DISTINCT FROM NEW.paused_at) THEN
        PERFORM webhook_enqueue('job.paused', NEW.job, jsonb_build_object(
            'event', 'job.paused', 'job', NEW.job, 'run_id', NULL, 'slot', NULL,
            'status', 'paused', 'paused_by', NEW.paused_by, 'note', NEW.pause_note,
            'failure_streak', NEW.failure_streak, 'stats', NULL, 'error', NEW.pause_note,
            'started_at', NULL, 'finished_at', NEW.paused_at), NULL);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER job_state_webhook AFTER INSERT OR UPDATE OF paused_at ON job_state
    FOR EACH ROW EXECUTE FUNCTION webhook_job_paused();
