-- Consecutive complete passes that did not see the item. An item is marked gone only
-- once this reaches the job's `gone_after` (default 2): offset paging over a live
-- catalogue can miss an item in one pass, as it shifts from one page to the next.
ALTER TABLE products ADD COLUMN missed_passes int NOT NULL DEFAULT 0;
