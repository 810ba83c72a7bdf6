-- The synced catalogue: one row per (source, account, external id). The raw item is
-- kept; the fields people query are mapped out of it. `hash` is the content hash of
-- the raw item: a pass that finds the same hash leaves the row untouched.
CREATE TABLE products (
    source       text NOT NULL,
    account      text NOT NULL,
    external_id  text NOT NULL,
    name         text,
    sku          text,
    ean          text,
    price        numeric(14, 4),
    currency     text,
    stock        integer,
    status       text,
    url          text,
    raw          jsonb NOT NULL,
    hash         bytea NOT NULL,
    first_seen   timestamptz NOT NULL DEFAULT now(),
    last_seen    timestamptz NOT NULL DEFAULT now(),
    gone_at      timestamptz,
    PRIMARY KEY (source, account, external_id)
);
-- Exact look-ups by EAN; name/sku search is a substring scan (ILIKE '%…%'), which a
-- btree could not serve, so no index is kept for it: every index slows the ingest.
CREATE INDEX products_ean ON products (ean);

-- The ids a pass has seen, for marking the rest gone at the end of a complete pass.
-- Logged on purpose: after a database crash a resumed pass must still know what the
-- runs before the crash saw, or it would mark those items gone.
CREATE TABLE sync_seen (
    run_id       bigint NOT NULL,
    external_id  text NOT NULL
);
CREATE INDEX sync_seen_run ON sync_seen (run_id, external_id);

CREATE INDEX runs_resumed_from ON runs (resumed_from) WHERE resumed_from IS NOT NULL;
