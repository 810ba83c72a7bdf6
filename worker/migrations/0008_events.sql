-- Seed 001's main-server role: the events it files and its local parsing operations.

-- One row per (source, external id): the event as the parsing server sent it is kept in
-- `raw`, the fields people query are mapped out of it. `hash` is the content hash of
-- `raw`: an event that comes back with the same hash is not rewritten.
-- `last_seen` is when a parse last created or changed it.
CREATE TABLE events (
    source       text NOT NULL,
    external_id  text NOT NULL,
    title        text NOT NULL,
    starts_at    timestamptz NOT NULL,
    ends_at      timestamptz,
    timezone     text,
    venue        text,
    address      text,
    city         text,
    country      text,
    category     text,
    price_min    numeric(14, 4),
    price_max    numeric(14, 4),
    currency     text,
    sale_status  text,
    url          text,
    image        text,
    raw          jsonb NOT NULL,
    hash         bytea NOT NULL,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, external_id)
);
-- `worker events` / `GET /events` filter by dates and city; a handful of events a week
-- are filed, so two indexes cost the ingest nothing that matters.
CREATE INDEX events_starts_at ON events (starts_at);
CREATE INDEX events_city ON events (lower(city), starts_at);

-- The seed's OperationsSchema on the main server: one row per operation asked of (or
-- found on) a parsing server, holding the remote operation's id. Not a run: it lives
-- across several runs (created Monday, read Tuesday, swept Sunday) and the sweep
-- records operations no run of ours created.
CREATE TABLE remote_operations (
    id             bigserial PRIMARY KEY,
    type           text NOT NULL,
    server         text NOT NULL,   -- PARSING_SERVER_URL, without credentials
    remote_id      text NOT NULL,
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'processing', 'success', 'error')),
    meta           jsonb,           -- what was sent; NULL for one the sweep found
    statistics     jsonb NOT NULL DEFAULT '{}',
    error_text     text NOT NULL DEFAULT '',
    info_text      text NOT NULL DEFAULT '',
    remote         jsonb,           -- the remote `operation` object as last read
    created_by     bigint REFERENCES runs (id) ON DELETE SET NULL,
    processed_by   bigint REFERENCES runs (id) ON DELETE SET NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    processed_at   timestamptz,
    UNIQUE (server, remote_id)
);
CREATE INDEX remote_operations_open ON remote_operations (server, type, created_at DESC)
    WHERE status IN ('pending', 'processing');
