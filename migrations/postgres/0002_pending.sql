-- What a pass is about to write, recorded before it writes: after a crash
-- between the write and the ledger update, the next pass recognises those
-- entries as its own instead of taking them for runtime installs.
ALTER TABLE ledger ADD COLUMN pending TEXT;
