-- The fence: one row holding the newest leader token. Every leader write reads it
-- FOR SHARE inside its transaction; a new leader raises it before doing any work.
CREATE TABLE fence (
    id         int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    token      bigint NOT NULL,
    holder     text NOT NULL,
    raised_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO fence (id, token, holder) VALUES (1, 0, '');

-- Every leadership term, for inspection and for proving terms never overlap.
CREATE TABLE leader_terms (
    token       bigint PRIMARY KEY,
    holder      text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    end_reason  text
);

-- When the scheduler first saw a job: slots before it are never owed.
CREATE TABLE job_state (
    job         text PRIMARY KEY,
    since       timestamptz NOT NULL DEFAULT now()
);

-- The slot ledger and run history. Claiming a slot is inserting its row.
CREATE TABLE runs (
    id            bigserial PRIMARY KEY,
    job           text NOT NULL,
    kind          text NOT NULL,
    slot          timestamptz,
    trigger       text NOT NULL CHECK (trigger IN ('schedule', 'manual', 'resume', 'api')),
    status        text NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed',
                                                  'cancelled', 'abandoned', 'missed')),
    token         bigint,
    attempt       int NOT NULL DEFAULT 1,
    params        jsonb NOT NULL DEFAULT '{}',
    cursor        jsonb,
    progress      jsonb NOT NULL DEFAULT '{}',
    stats         jsonb NOT NULL DEFAULT '{}',
    result        jsonb,
    error         text,
    resumed_from  bigint REFERENCES runs (id) ON DELETE SET NULL,
    requested_by  text,
    worker_id     text,
    heartbeat_at  timestamptz,
    cancel_requested_at timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    UNIQUE (job, slot)
);
CREATE INDEX runs_active ON runs (status, id) WHERE status IN ('queued', 'running');
CREATE INDEX runs_job_created ON runs (job, id DESC);
