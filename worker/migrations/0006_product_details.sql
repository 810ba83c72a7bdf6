-- What an item's own page says that its summary does not (eBay `details = true`):
-- MPN and brand beside the summary's fields (the GTIN goes to `ean`), the item
-- specifics and compatibility in `details`. `details_pending`: created or changed by a
-- pass and not yet fetched (the per-run cap carries the rest to the next pass).
ALTER TABLE products ADD COLUMN mpn text;
ALTER TABLE products ADD COLUMN brand text;
ALTER TABLE products ADD COLUMN details jsonb;
ALTER TABLE products ADD COLUMN details_at timestamptz;
ALTER TABLE products ADD COLUMN details_pending boolean NOT NULL DEFAULT false;
CREATE INDEX products_details_pending ON products (source, account) WHERE details_pending;
