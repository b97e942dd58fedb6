-- The stamps of an env dir's files as the last full pass found them holding
-- exactly the ledger's render (JSON): while the files show the same stamps,
-- a pass does not read them again. A cache: dropping it costs one read.
ALTER TABLE ledger ADD COLUMN seen TEXT;
