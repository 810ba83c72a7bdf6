-- The fence audit (issue 12): which term wrote to which table, and when, on the
-- database's clock. `db.fenced` sets `worker.token` for its transaction; the triggers
-- below copy it beside the writes. A write outside a fenced transaction (the API
-- queueing a run, an operator's pause) is recorded with token NULL.
--
-- One row per (transaction, table), not one per row: the audit row's id is kept in a
-- transaction-local setting named after the table (a savepoint rolled back takes the
-- row and the setting with it), and each later statement on the table only moves `at`
-- to its own end. So `at` is a time within the transaction's last statement on the
-- table, which comes before its commit, which comes before any successor's fence raise
-- (see the check in tests/chaos/audit.py: no write of token T at or after the start of
-- a newer term).
--
-- Two kinds of tables:
-- * the ledger and other small tables: a BEFORE ROW trigger audits the first row a
--   transaction changes (its WHEN is false for every later row), so a statement that
--   changes nothing (the reaper's idle passes) writes no audit row;
-- * the bulk tables (COPY, batch merges): a statement trigger only, since any BEFORE
--   ROW trigger makes COPY insert row by row (measured: -6 % on a 10 000-item upsert).
--   A statement that matched no row is audited too (once per transaction).
CREATE TABLE write_audit (
    id        bigserial PRIMARY KEY,
    tbl       text NOT NULL,
    token     bigint,
    txid      bigint NOT NULL DEFAULT txid_current(),
    first_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- For pruning; `at` is not indexed, so moving it is a HOT update.
CREATE INDEX write_audit_first_at ON write_audit (first_at);

CREATE FUNCTION write_audit_begin(tbl text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    audit_id bigint;
BEGIN
    INSERT INTO write_audit (tbl, token)
    VALUES (tbl, nullif(current_setting('worker.token', true), '')::bigint)
    RETURNING id INTO audit_id;
    PERFORM set_config('worker.audit_' || tbl, audit_id::text, true);
END $$;

-- BEFORE ROW, on the first row a transaction changes in the table. Marks the audit row
-- fresh, so that the statement's own AFTER trigger does not move `at` again.
CREATE FUNCTION write_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM write_audit_begin(TG_TABLE_NAME);
    PERFORM set_config('worker.audit_fresh', TG_TABLE_NAME, true);
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END $$;

-- AFTER STATEMENT: the transaction's audit row of the table, begun if need be.
CREATE FUNCTION write_audit_statement() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    audit_id bigint := nullif(current_setting('worker.audit_' || TG_TABLE_NAME, true), '');
BEGIN
    IF audit_id IS NULL THEN
        PERFORM write_audit_begin(TG_TABLE_NAME);
    ELSIF current_setting('worker.audit_fresh', true) = TG_TABLE_NAME THEN
        PERFORM set_config('worker.audit_fresh', '', true);
    ELSE
        UPDATE write_audit SET at = clock_timestamp() WHERE id = audit_id;
    END IF;
    RETURN NULL;
END $$;

DO $$
DECLARE
    t text;
    flag text;
BEGIN
    FOREACH t IN ARRAY ARRAY['runs', 'job_state', 'leader_terms', 'remote_operations',
                             'webhook_targets', 'webhook_outbox'] LOOP
        flag := 'worker.audit_' || t;
        EXECUTE format(
            'CREATE TRIGGER %I BEFORE INSERT OR UPDATE OR DELETE ON %I FOR EACH ROW'
            ' WHEN (coalesce(current_setting(%L, true), '''') = '''')'
            ' EXECUTE FUNCTION write_audit_row()', t || '_audit', t, flag);
        EXECUTE format(
            'CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %I FOR EACH STATEMENT'
            ' WHEN (coalesce(current_setting(%L, true), '''') <> '''')'
            ' EXECUTE FUNCTION write_audit_statement()', t || '_audit_last', t, flag);
    END LOOP;
    FOREACH t IN ARRAY ARRAY['products', 'sync_seen', 'events', 'run_items'] LOOP
        EXECUTE format(
            'CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %I FOR EACH STATEMENT'
            ' EXECUTE FUNCTION write_audit_statement()', t || '_audit', t);
    END LOOP;
END $$;
