-- Parsing operations (seed 001) are runs: a `parse.*` run queued by POST /parsing/create
-- is an operation, its id the operation id. What the seed's main server marks after
-- reading the results is `processed_at` (is_processed).
ALTER TABLE runs ADD COLUMN processed_at timestamptz;

-- The results a consumer reads later, saved in batches as a run produces them, so a
-- crash keeps every finished batch. Keyed by the operation (the first run of a resume
-- chain), so the batches of every run of the chain read as one list.
CREATE TABLE run_items (
    operation_id  bigint NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    seq           int NOT NULL,
    batch         int NOT NULL,
    item          jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operation_id, seq)
);
